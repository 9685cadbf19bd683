//! The journal: what a handler did, as data, and how a replay follows it.
//!
//! An invocation's journal is a totally ordered list of entries. A
//! [`Command`] is something the handler asked for (read state, run a step);
//! a [`Completion`] is the answer, linked to its command by the command's
//! index. Keeping the two apart is what makes replay order total even when
//! answers arrive in a different order than the questions (timers, calls):
//! the journal records the order in which the handler *observed* them.
//!
//! Replay rule (the same for every host function, see [`Journal::issue`]):
//! the handler's k-th command must equal the k-th journaled command in
//! everything the handler chose (kind, name, target, input, delay, state
//! value, produce key and value, HTTP request; see [`Command::replays_as`]);
//! then its journaled completion is returned and nothing is executed. A
//! different command is a [`JournalMismatch`]: the invocation stops and the
//! journal is never overwritten. So is a handler that returns while
//! journaled commands remain unconsumed ([`Journal::unconsumed`]). Past the
//! end of the journal the handler runs live and new entries are appended.

use crate::records::Target;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Something the handler asked the host for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Read one state value.
    GetState { name: String },
    /// Write one state value.
    SetState { name: String, value: Vec<u8> },
    /// Remove one state value.
    ClearState { name: String },
    /// Remove every state value of the key.
    ClearAllState,
    /// List the key's state names.
    GetStateKeys,
    /// A durable side-effect step.
    Run { name: String },
    /// A durable timer, due at an absolute time.
    Sleep { wake_at_ms: u64 },
    /// A request-response call to another handler; `callee` is the id of
    /// the invocation it created.
    Call {
        target: Target,
        input: Vec<u8>,
        callee: String,
    },
    /// A one-way invocation of another handler, optionally delayed.
    Send {
        target: Target,
        input: Vec<u8>,
        delay_ms: u64,
    },
    /// An awakeable that an outside system completes.
    Awakeable,
    /// Complete an awakeable (of any invocation).
    CompleteAwakeable { id: String, outcome: Outcome },
    /// Wait for a workflow promise.
    GetPromise { name: String },
    /// Look at a workflow promise without waiting.
    PeekPromise { name: String },
    /// Resolve or reject a workflow promise.
    CompletePromise { name: String, outcome: Outcome },
    /// Read the clock.
    Now,
    /// Produce a Kafka record.
    Produce {
        cluster: String,
        topic: String,
        key: Option<Vec<u8>>,
        value: Vec<u8>,
    },
    /// An HTTP request made by the host.
    HttpCall(HttpRequest),
    /// Cancel another invocation.
    Cancel { id: String },
    /// Produce a Kafka record with headers, a raw value and maybe a
    /// partition (`kafka-send`; `Produce` is `kafka-produce`'s, kept for
    /// the journals that hold it).
    SendRecord(KafkaRecord),
}

/// A Kafka record a handler produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaRecord {
    /// The registered cluster's name.
    pub cluster: String,
    /// The topic.
    pub topic: String,
    /// The partition; `None`: the key's.
    pub partition: Option<i32>,
    /// The key.
    pub key: Option<Vec<u8>>,
    /// The value.
    pub value: Vec<u8>,
    /// The headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Command {
    /// The Kafka record a produce command sends, if it is one.
    pub fn kafka_record(&self) -> Option<KafkaRecord> {
        match self {
            Command::Produce {
                cluster,
                topic,
                key,
                value,
            } => Some(KafkaRecord {
                cluster: cluster.clone(),
                topic: topic.clone(),
                partition: None,
                key: key.clone(),
                value: value.clone(),
                headers: Vec::new(),
            }),
            Command::SendRecord(record) => Some(record.clone()),
            _ => None,
        }
    }
}

/// An HTTP request the host makes for a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRequest {
    /// Method.
    pub method: String,
    /// URL.
    pub url: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Per-try timeout in ms (0: 30 s).
    pub timeout_ms: u64,
    /// Tries before a failure is final.
    pub max_attempts: u32,
}

/// The answer to a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Index of the command this answers (0 = the handler's first command).
    pub command: u32,
    /// The answer.
    pub value: CompletionValue,
}

/// The payload of a completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CompletionValue {
    /// A state value, or none.
    State(Option<Vec<u8>>),
    /// State names.
    StateKeys(Vec<String>),
    /// A step's (or a pending operation's) outcome.
    Outcome(Outcome),
    /// An optional outcome (a peeked promise).
    MaybeOutcome(Option<Outcome>),
    /// An id (of a sent invocation or a created awakeable).
    Id(String),
    /// A time, ms since the epoch.
    Time(u64),
}

/// Success or terminal failure, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// JSON-encoded value.
    Success(Vec<u8>),
    /// Terminal failure with a status code.
    Failure { code: u16, message: String },
}

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Entry {
    /// A command the handler issued.
    Command(Command),
    /// An answer to an earlier command.
    Completion(Completion),
}

impl Entry {
    /// The stored form (postcard: compact and stable for a given enum shape;
    /// new variants are only ever appended).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("journal entries always encode")
    }

    /// Decode a stored entry.
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

impl Command {
    /// The kind and name that replay compares, e.g. `run "charge"`.
    pub fn signature(&self) -> String {
        match self {
            Command::GetState { name } => format!("get-state {name:?}"),
            Command::SetState { name, .. } => format!("set-state {name:?}"),
            Command::ClearState { name } => format!("clear-state {name:?}"),
            Command::ClearAllState => "clear-all-state".into(),
            Command::GetStateKeys => "state-keys".into(),
            Command::Run { name } => format!("run {name:?}"),
            Command::Sleep { .. } => "sleep".into(),
            Command::Call { target, .. } => format!("call {target}"),
            Command::Send { target, .. } => format!("send {target}"),
            Command::Awakeable => "awakeable".into(),
            Command::CompleteAwakeable { id, .. } => format!("complete-awakeable {id}"),
            Command::GetPromise { name } => format!("get-promise {name:?}"),
            Command::PeekPromise { name } => format!("peek-promise {name:?}"),
            Command::CompletePromise { name, .. } => format!("complete-promise {name:?}"),
            Command::Now => "now".into(),
            Command::Produce { cluster, topic, .. }
            | Command::SendRecord(KafkaRecord { cluster, topic, .. }) => {
                format!("produce kafka://{cluster}/{topic}")
            }
            Command::HttpCall(r) => format!("http {} {}", r.method, r.url),
            Command::Cancel { id } => format!("cancel {id}"),
        }
    }

    /// Whether a handler that issues `issued` where this command is
    /// journaled is replaying it: equal in everything the handler chose.
    /// What the host chose is not compared: the id it gave a call's callee,
    /// and a sleep's wake-up time (computed from the clock when issued).
    pub fn replays_as(&self, issued: &Command) -> bool {
        match (self, issued) {
            (
                Command::Call { target, input, .. },
                Command::Call {
                    target: t2,
                    input: i2,
                    ..
                },
            ) => target == t2 && input == i2,
            (Command::Sleep { .. }, Command::Sleep { .. }) => true,
            (journaled, issued) => journaled == issued,
        }
    }

    /// Whether the command's completion arrives later (it returns a handle).
    pub fn is_pending(&self) -> bool {
        matches!(
            self,
            Command::Sleep { .. }
                | Command::Call { .. }
                | Command::Awakeable
                | Command::GetPromise { .. }
                | Command::Produce { .. }
                | Command::SendRecord(_)
                | Command::HttpCall(_)
        )
    }
}

/// A handler issued a different command than the journal holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "journal mismatch at entry {entry}: the journal has {journaled}, the handler issued {issued}"
)]
pub struct JournalMismatch {
    /// Index of the journal entry that differs.
    pub entry: u32,
    /// What the journal holds there.
    pub journaled: String,
    /// What the handler issued instead.
    pub issued: String,
}

/// What to do with a command the handler just issued.
#[derive(Debug, PartialEq)]
pub enum Issued {
    /// Already journaled: return this completion (if the command has one)
    /// and execute nothing.
    Replayed(Option<CompletionValue>),
    /// New: execute it; this is its index (its handle).
    Live(u32),
}

/// A completion with its position in the journal: among several completed
/// handles, the one with the lowest entry index was observed first.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrived {
    /// Entry index of the completion.
    pub entry: u32,
    /// The answer.
    pub value: CompletionValue,
}

/// An invocation's journal during one attempt: the commands loaded at the
/// start, every completion known so far, and a cursor.
#[derive(Debug, Default)]
pub struct Journal {
    /// (entry index, command) for every journaled command, in order.
    commands: Vec<(u32, Command)>,
    /// Completions by command index.
    completions: HashMap<u32, Arrived>,
    /// Indexes of commands whose completion arrives later (handles).
    awaitable: std::collections::BTreeSet<u32>,
    /// Commands the handler issued so far in this attempt.
    next_command: u32,
}

impl Journal {
    /// Rebuild from stored `(entry index, entry)` pairs, in order.
    pub fn from_entries(entries: impl IntoIterator<Item = (u32, Entry)>) -> Self {
        let mut journal = Journal::default();
        for (index, entry) in entries {
            match entry {
                Entry::Command(c) => {
                    if c.is_pending() {
                        journal.awaitable.insert(journal.commands.len() as u32);
                    }
                    journal.commands.push((index, c));
                }
                Entry::Completion(c) => journal.arrive(index, c),
            }
        }
        journal
    }

    /// Record a completion (loaded, or delivered live). A completion the
    /// journal already has is ignored.
    pub fn arrive(&mut self, entry: u32, completion: Completion) {
        self.completions
            .entry(completion.command)
            .or_insert(Arrived {
                entry,
                value: completion.value,
            });
    }

    /// Whether the handler is still replaying journaled commands.
    pub fn is_replaying(&self) -> bool {
        (self.next_command as usize) < self.commands.len()
    }

    /// Commands issued so far (journaled or live): valid handles are below.
    pub fn issued(&self) -> u32 {
        self.next_command
    }

    /// The handler issued `command`: match it against the journal.
    pub fn issue(&mut self, command: &Command) -> Result<Issued, JournalMismatch> {
        let index = self.next_command;
        if let Some((entry, journaled)) = self.commands.get(index as usize) {
            if !journaled.replays_as(command) {
                let (journaled, mut issued) = (journaled.signature(), command.signature());
                if journaled == issued {
                    issued.push_str(" with different arguments");
                }
                return Err(JournalMismatch {
                    entry: *entry,
                    journaled,
                    issued,
                });
            }
            self.next_command += 1;
            return Ok(Issued::Replayed(
                self.completion(index).map(|a| a.value.clone()),
            ));
        }
        self.next_command += 1;
        if command.is_pending() {
            self.awaitable.insert(index);
        }
        Ok(Issued::Live(index))
    }

    /// The mismatch of a handler that returned now: some journaled command
    /// was never issued again.
    pub fn unconsumed(&self) -> Option<JournalMismatch> {
        let (entry, journaled) = self.commands.get(self.next_command as usize)?;
        Some(JournalMismatch {
            entry: *entry,
            journaled: journaled.signature(),
            issued: "no further command (the handler returned)".into(),
        })
    }

    /// Every journaled command with its command index.
    pub fn commands(&self) -> impl Iterator<Item = (u32, &Command)> {
        (0..).zip(self.commands.iter().map(|(_, c)| c))
    }

    /// Whether `handle` names a pending operation issued so far.
    pub fn is_awaitable(&self, handle: u32) -> bool {
        handle < self.next_command && self.awaitable.contains(&handle)
    }

    /// The completion of command `index`, if it has arrived.
    pub fn completion(&self, index: u32) -> Option<&Arrived> {
        self.completions.get(&index)
    }

    /// Among `handles`, the position of the one completed first (lowest
    /// entry index), if any is completed.
    pub fn first_completed(&self, handles: &[u32]) -> Option<usize> {
        handles
            .iter()
            .enumerate()
            .filter_map(|(pos, h)| Some((self.completions.get(h)?.entry, pos)))
            .min()
            .map(|(_, pos)| pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str) -> Command {
        Command::Run { name: name.into() }
    }

    fn done(command: u32, value: &[u8]) -> Entry {
        Entry::Completion(Completion {
            command,
            value: CompletionValue::Outcome(Outcome::Success(value.to_vec())),
        })
    }

    #[test]
    fn entries_round_trip_through_their_encoding() {
        let entries = vec![
            Entry::Command(Command::SetState {
                name: "count".into(),
                value: b"41".to_vec(),
            }),
            Entry::Command(Command::ClearAllState),
            done(3, b"\"ok\""),
            Entry::Completion(Completion {
                command: 1,
                value: CompletionValue::Outcome(Outcome::Failure {
                    code: 409,
                    message: "no".into(),
                }),
            }),
            Entry::Completion(Completion {
                command: 2,
                value: CompletionValue::StateKeys(vec!["a".into(), "b".into()]),
            }),
        ];
        for e in entries {
            assert_eq!(Entry::decode(&e.encode()).unwrap(), e);
        }
        assert!(Entry::decode(&[0xff, 0xff]).is_err());
    }

    #[test]
    fn the_encoding_is_stable() {
        // Stored journals must stay readable: the bytes of an entry may never change.
        assert_eq!(Entry::Command(run("a")).encode(), vec![0, 5, 1, b'a']);
        assert_eq!(done(2, b"1").encode(), vec![1, 2, 2, 0, 1, b'1']);
    }

    fn numbered(entries: Vec<Entry>) -> Vec<(u32, Entry)> {
        (0..).zip(entries).collect()
    }

    /// A journal of two completed steps, "one" (1) and "two" (2).
    fn two_steps() -> Journal {
        Journal::from_entries(numbered(vec![
            Entry::Command(run("one")),
            done(0, b"1"),
            Entry::Command(run("two")),
            done(1, b"2"),
        ]))
    }

    #[test]
    fn replay_returns_journaled_completions_then_goes_live() {
        let mut j = two_steps();
        assert!(j.is_replaying());
        let first = j.issue(&run("one")).unwrap();
        assert_eq!(
            first,
            Issued::Replayed(Some(CompletionValue::Outcome(Outcome::Success(
                b"1".to_vec()
            ))))
        );
        j.issue(&run("two")).unwrap();
        assert!(!j.is_replaying());
        assert_eq!(j.issue(&run("three")).unwrap(), Issued::Live(2));
        assert_eq!(j.issued(), 3);
        assert!(!j.is_awaitable(2), "a run step is not a pending operation");
    }

    #[test]
    fn the_first_completion_in_journal_order_wins_a_race() {
        let sleep = Command::Sleep { wake_at_ms: 5 };
        let mut j = Journal::from_entries(numbered(vec![
            Entry::Command(sleep.clone()),
            Entry::Command(sleep.clone()),
            Entry::Command(sleep),
            done(2, b"null"),
            done(0, b"null"),
        ]));
        for _ in 0..3 {
            j.issue(&Command::Sleep { wake_at_ms: 99 }).unwrap();
        }
        assert!(j.is_awaitable(1) && !j.is_awaitable(3));
        assert_eq!(
            j.first_completed(&[0, 1, 2]),
            Some(2),
            "command 2 completed first (entry 3)"
        );
        assert_eq!(j.first_completed(&[1, 0]), Some(1));
        assert_eq!(j.first_completed(&[1]), None);
        let value = |v| CompletionValue::Time(v);
        j.arrive(
            9,
            Completion {
                command: 1,
                value: value(1),
            },
        );
        j.arrive(
            10,
            Completion {
                command: 1,
                value: value(2),
            },
        );
        assert_eq!(
            j.completion(1).unwrap().value,
            value(1),
            "duplicates are ignored"
        );
    }

    #[test]
    fn a_different_command_is_a_mismatch_naming_the_entry() {
        let mut j = two_steps();
        j.issue(&run("one")).unwrap();
        let err = j
            .issue(&Command::GetState { name: "x".into() })
            .unwrap_err();
        assert_eq!(err.entry, 2);
        assert_eq!(
            err.to_string(),
            "journal mismatch at entry 2: the journal has run \"two\", the handler issued get-state \"x\""
        );
        let mut j =
            Journal::from_entries(numbered(vec![Entry::Command(run("one")), done(0, b"1")]));
        assert!(
            j.issue(&run("uno")).is_err(),
            "a renamed step is a mismatch too"
        );
    }

    #[test]
    fn the_whole_command_is_compared_but_not_what_the_host_chose() {
        let target = Target {
            service: "Counter".into(),
            handler: "add".into(),
            key: Some("k".into()),
        };
        let send = |input: &[u8], delay_ms| Command::Send {
            target: target.clone(),
            input: input.to_vec(),
            delay_ms,
        };
        let call = |input: &[u8], callee: &str| Command::Call {
            target: target.clone(),
            input: input.to_vec(),
            callee: callee.into(),
        };
        let set = |v: &[u8]| Command::SetState {
            name: "n".into(),
            value: v.to_vec(),
        };
        assert!(send(b"1", 0).replays_as(&send(b"1", 0)));
        assert!(!send(b"1", 0).replays_as(&send(b"2", 0)), "input");
        assert!(!send(b"1", 0).replays_as(&send(b"1", 5)), "delay");
        assert!(!set(b"1").replays_as(&set(b"2")), "state value");
        assert!(
            call(b"1", "inv_a").replays_as(&call(b"1", "inv_b")),
            "callee id"
        );
        assert!(!call(b"1", "inv_a").replays_as(&call(b"2", "inv_a")));
        assert!(Command::Sleep { wake_at_ms: 1 }.replays_as(&Command::Sleep { wake_at_ms: 2 }));
        let produce = |v: &[u8]| Command::Produce {
            cluster: "c".into(),
            topic: "t".into(),
            key: None,
            value: v.to_vec(),
        };
        assert!(!produce(b"a").replays_as(&produce(b"b")), "produce value");
        let mut j = Journal::from_entries(numbered(vec![Entry::Command(send(b"1", 0))]));
        let err = j.issue(&send(b"2", 0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "journal mismatch at entry 0: the journal has send Counter/k/add, \
             the handler issued send Counter/k/add with different arguments"
        );
    }

    #[test]
    fn returning_before_the_journal_is_consumed_is_a_mismatch() {
        let mut j = two_steps();
        j.issue(&run("one")).unwrap();
        let err = j.unconsumed().expect("run \"two\" was not issued again");
        assert_eq!(err.entry, 2);
        assert!(
            err.to_string().contains("the journal has run \"two\""),
            "{err}"
        );
        j.issue(&run("two")).unwrap();
        assert_eq!(j.unconsumed(), None);
    }
}
