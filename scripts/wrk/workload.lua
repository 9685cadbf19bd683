-- wrk script for the HTTP workloads of `scripts/bench.sh wrk`:
--   wrk ... -s scripts/wrk/workload.lua http://127.0.0.1:18080 -- steps3|counter-keys|counter-hot
local paths = {
  ["steps3"] = function(_) return "/Steps/steps3" end,
  ["counter-keys"] = function(i) return "/Counter/k" .. (i % 1000) .. "/add" end,
  ["counter-hot"] = function(_) return "/Counter/hot/add" end,
}
local path
local i = 0

function init(args)
  path = paths[args[1]]
  if path == nil then
    error("unknown workload " .. tostring(args[1]) .. ": steps3, counter-keys or counter-hot")
  end
  wrk.method = "POST"
  wrk.headers["content-type"] = "application/json"
  wrk.body = args[1] == "steps3" and "" or "1"
end

function request()
  i = i + 1
  return wrk.format(nil, path(i))
end
