//! Log output: to stderr (stdout is for what a command prints), as text or, with `SPLITPAY_LOG_FORMAT=json`, as one
//! JSON object per line with the fields of the spans it happened in; and the `job` span every job handler runs in.

use tracing::field::Empty;

/// `SPLITPAY_LOG_FORMAT`: how log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields`, `target`, and `span`/`spans` with their fields.
    Json,
}

impl LogFormat {
    /// Reads `SPLITPAY_LOG_FORMAT` through `get` (`text` when unset).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, crate::config::ConfigError> {
        match get("SPLITPAY_LOG_FORMAT").as_deref().map(str::trim) {
            None | Some("") | Some("text") => Ok(LogFormat::Text),
            Some("json") => Ok(LogFormat::Json),
            Some(other) => Err(crate::config::ConfigError::Invalid {
                name: "SPLITPAY_LOG_FORMAT",
                reason: format!("expected 'text' or 'json', got '{other}'"),
            }),
        }
    }
}

/// Installs the process's log subscriber: `RUST_LOG` if set, else `default_filter`.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).init(),
    }
}

/// The span a job runs in. The queue's own id is filled in at once (a distribute job's is the split payment's, a
/// transfer job's the allocation's); a handler that learns the other one records it with [`record_payment`] or
/// [`record_allocation`], so every line logged inside the job carries both.
pub fn job_span(queue: crate::jobs::queue::Queue, id: &str) -> tracing::Span {
    use crate::jobs::queue::Queue;
    let span = tracing::info_span!(
        "job",
        queue = queue.name(),
        job_id = id,
        split_payment_id = Empty,
        split_allocation_id = Empty
    );
    match queue {
        Queue::Distribute => {
            span.record("split_payment_id", id);
        }
        Queue::Transfer => {
            span.record("split_allocation_id", id);
        }
        Queue::StripeEvent | Queue::Deliver | Queue::Reversal => {}
    }
    span
}

/// Names the split payment the current job works on (a no-op outside a job span).
pub fn record_payment(split_payment_id: &str) {
    tracing::Span::current().record("split_payment_id", split_payment_id);
}

/// Names the split allocation the current job works on (a no-op outside a job span).
pub fn record_allocation(split_allocation_id: &str) {
    tracing::Span::current().record("split_allocation_id", split_allocation_id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_format_is_text_or_json() {
        let read = |v: Option<&str>| LogFormat::from_lookup(|_| v.map(str::to_owned));
        assert_eq!(read(None).unwrap(), LogFormat::Text);
        assert_eq!(read(Some("json")).unwrap(), LogFormat::Json);
        assert_eq!(read(Some("text")).unwrap(), LogFormat::Text);
        let err = read(Some("yaml")).unwrap_err().to_string();
        assert!(err.contains("SPLITPAY_LOG_FORMAT") && err.contains("yaml"), "{err}");
    }
}
