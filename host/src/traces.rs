//! OpenTelemetry traces of invocations, exported over OTLP/HTTP.
//!
//! **Why spans are built by hand.** A durable invocation outlives the
//! attempt, the instance and even the process that started it, so its span
//! cannot be an open in-memory span: Cairn writes each span once, when what
//! it describes is over, with ids it can compute again after a restart.
//!
//! - An invocation's **parent** is the W3C `traceparent` among its headers:
//!   the HTTP request's, the Kafka ingest span's, or the caller's call or
//!   send span (the host writes it into the callee's headers, so a handler
//!   also sees it). Without one, the invocation starts a trace.
//! - The **invocation span** has ids derived from the invocation id (the
//!   trace id too when there is no parent), so every attempt, on any host,
//!   names the same parent. It is written when the invocation completes,
//!   from its creation to its completion.
//! - Each **attempt** gets a span, child of the invocation span; the
//!   attempt's `run` steps, calls, sends and sleeps are its children. A
//!   call's (or send's) span id goes into the callee's `traceparent`, so
//!   the callee's invocation is its child.
//! - `http_call` and `kafka_produce` are performed by the host's outbox,
//!   possibly after a restart: their spans are children of the invocation
//!   span, and their `traceparent` is injected into the outgoing request
//!   (a header) and the produced record (a record header).
//! - A Kafka record's **ingest** span continues the record's own
//!   `traceparent` header, and is the created invocation's parent.
//!
//! A parent that says "not sampled" (flags `00`) is honoured: nothing under
//! it is exported. Export is off unless `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `[tracing] endpoint` names a collector; `OTEL_EXPORTER_OTLP_PROTOCOL`
//! picks `http/protobuf` (default) or `http/json`, `OTEL_SERVICE_NAME` the
//! service name (default `cairn`), and the batch processor's
//! `OTEL_BSP_*` variables its pace. Spans are queued to a batch processor
//! (bounded: 2,048 by default, excess spans are dropped, never waited for)
//! that exports on its own thread.

use crate::ids::InvocationId;
use crate::records::InvocationRecord;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SpanData, SpanProcessor};
use sha2::{Digest, Sha256};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The header (and Kafka record header) that carries a span's context.
pub const TRACEPARENT: &str = "traceparent";

/// A span's identity, as a W3C `traceparent` carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanRef {
    /// The trace it belongs to.
    pub trace: TraceId,
    /// The span itself.
    pub span: SpanId,
    /// Whether it (and everything under it) is exported.
    pub sampled: bool,
}

impl SpanRef {
    /// Parse `00-<32 hex>-<16 hex>-<2 hex>`; None for anything else.
    pub fn parse(traceparent: &str) -> Option<SpanRef> {
        let mut parts = traceparent.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 {
            return None;
        }
        let trace = TraceId::from_hex(trace).ok()?;
        let span = SpanId::from_hex(span).ok()?;
        let flags = u8::from_str_radix(flags.get(..2)?, 16).ok()?;
        (trace != TraceId::INVALID && span != SpanId::INVALID).then_some(SpanRef {
            trace,
            span,
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` value naming this span.
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace,
            self.span,
            u8::from(self.sampled)
        )
    }

    /// A new span under this one, with a fresh random id.
    pub fn child(&self) -> SpanRef {
        SpanRef {
            span: SpanId::from_bytes(rand::random::<[u8; 8]>()),
            ..*self
        }
    }

    /// A span under this one whose id is derived from `what`: the same
    /// span after a restart.
    fn derived(&self, what: &str) -> SpanRef {
        let digest = Sha256::digest(what.as_bytes());
        SpanRef {
            span: SpanId::from_bytes(digest[..8].try_into().expect("8 bytes")),
            ..*self
        }
    }
}

/// Where an invocation sits in its trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvocationTrace {
    /// Its parent (from its `traceparent` header), if any.
    pub parent: Option<SpanRef>,
    /// Its own span.
    pub span: SpanRef,
}

impl InvocationTrace {
    /// The trace position of `record`, the same every time it is computed.
    pub fn of(record: &InvocationRecord) -> InvocationTrace {
        InvocationTrace::under(parent_in(&record.headers), &record.id)
    }

    /// The trace position of invocation `id` under `parent`.
    pub fn under(parent: Option<SpanRef>, id: &InvocationId) -> InvocationTrace {
        let id = id.to_string();
        let above = parent.unwrap_or_else(|| root(&id));
        InvocationTrace {
            parent,
            span: above.derived(&format!("invocation:{id}")),
        }
    }
}

/// The span a request's (or a record's) `traceparent` header names, if any.
pub fn parent_in(headers: &[(String, String)]) -> Option<SpanRef> {
    headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(TRACEPARENT))
        .and_then(|(_, value)| SpanRef::parse(value))
}

/// The span of the Kafka ingest of the record that `source` (its
/// deduplication key) names, under the record's own `traceparent`: the
/// same span however often the record is delivered.
pub fn ingest_span(parent: Option<SpanRef>, source: &str) -> SpanRef {
    parent
        .unwrap_or_else(|| root(source))
        .derived(&format!("ingest:{source}"))
}

/// The start of a new trace, derived from `seed` (no span of its own).
fn root(seed: &str) -> SpanRef {
    let digest = Sha256::digest(format!("trace:{seed}").as_bytes());
    SpanRef {
        trace: TraceId::from_bytes(digest[..16].try_into().expect("16 bytes")),
        span: SpanId::INVALID,
        sampled: true,
    }
}

/// One finished span to export.
pub struct Span<'a> {
    /// Its name, e.g. `Orders/place` or `run "charge"`.
    pub name: String,
    /// Its identity.
    pub me: SpanRef,
    /// Its parent, if any.
    pub parent: Option<SpanRef>,
    /// Server, client, producer, consumer or internal.
    pub kind: SpanKind,
    /// When it started and ended.
    pub start: SystemTime,
    pub end: SystemTime,
    /// Its attributes.
    pub attributes: Vec<KeyValue>,
    /// Why it failed, if it did.
    pub error: Option<&'a str>,
}

/// The host's span exporter (a no-op unless an OTLP endpoint is set).
pub struct Traces {
    processor: Option<BatchSpanProcessor>,
}

static TRACES: OnceLock<Traces> = OnceLock::new();

impl Traces {
    /// The process's traces: set up once by [`Traces::init`], off before.
    pub fn get() -> &'static Traces {
        TRACES.get_or_init(|| Traces { processor: None })
    }

    /// Export to `endpoint` (the config's), else to
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, else nowhere. Call once at start.
    pub fn init(endpoint: Option<&str>) -> anyhow::Result<()> {
        let env = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok();
        let Some(base) = endpoint.map(str::to_string).or(env) else {
            TRACES.get_or_init(|| Traces { processor: None });
            return Ok(());
        };
        let processor = processor(&base)?;
        if TRACES
            .set(Traces {
                processor: Some(processor),
            })
            .is_err()
        {
            anyhow::bail!("traces were set up twice");
        }
        tracing::info!("exporting traces over OTLP to {base}");
        Ok(())
    }

    /// Whether spans are exported (callers skip building them otherwise).
    pub fn enabled(&self) -> bool {
        self.processor.is_some()
    }

    /// Export `span` (if tracing is on and its trace is sampled).
    pub fn emit(&self, span: Span<'_>) {
        let Some(processor) = &self.processor else {
            return;
        };
        if !span.me.sampled {
            return;
        }
        let flags = TraceFlags::SAMPLED;
        processor.on_end(SpanData {
            span_context: SpanContext::new(
                span.me.trace,
                span.me.span,
                flags,
                false,
                TraceState::default(),
            ),
            parent_span_id: span.parent.map_or(SpanId::INVALID, |p| p.span),
            parent_span_is_remote: false,
            span_kind: span.kind,
            name: span.name.into(),
            start_time: span.start,
            end_time: span.end.max(span.start),
            attributes: span.attributes,
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: match span.error {
                Some(e) => Status::error(e.to_string()),
                None => Status::Unset,
            },
            instrumentation_scope: InstrumentationScope::builder("cairn")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        });
    }

    /// Export what is queued (at shutdown).
    pub fn flush(&self) {
        if let Some(processor) = &self.processor {
            let _ = processor.force_flush();
        }
    }
}

/// A batch processor exporting to `{base}/v1/traces`.
fn processor(base: &str) -> anyhow::Result<BatchSpanProcessor> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
        Ok("http/json") => Protocol::HttpJson,
        Ok("http/protobuf") | Err(_) => Protocol::HttpBinary,
        Ok(other) => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported: use http/protobuf or http/json"
        ),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')))
        .with_timeout(Duration::from_secs(10))
        .build()?;
    let mut processor = BatchSpanProcessor::builder(exporter).build();
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "cairn".into());
    processor.set_resource(
        &opentelemetry_sdk::Resource::builder()
            .with_service_name(service)
            .build(),
    );
    Ok(processor)
}

/// Ms since the epoch as a time.
pub fn at_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_reads_back_and_bad_ones_are_refused() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let span = SpanRef::parse(header).expect("a valid traceparent");
        assert!(span.sampled);
        assert_eq!(span.header(), header);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(SpanRef::parse(bad), None, "{bad:?}");
        }
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!SpanRef::parse(unsampled).unwrap().sampled);
    }

    #[test]
    fn an_invocation_keeps_its_span_across_restarts_and_continues_its_parent() {
        let id = InvocationId::generate(0);
        let root = InvocationTrace::under(None, &id);
        assert_eq!(
            root,
            InvocationTrace::under(None, &id),
            "derived, not random"
        );
        assert_eq!(root.parent, None);
        let parent = SpanRef::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let child = InvocationTrace::under(parent, &id);
        assert_eq!(child.span.trace, parent.unwrap().trace, "the same trace");
        assert_ne!(child.span.span, parent.unwrap().span);
        let other = InvocationTrace::under(None, &InvocationId::generate(0));
        assert_ne!(other.span.trace, root.span.trace, "a trace per root");
    }
}
