//! The most recent log lines, kept in memory for the control channel's diagnostics command.
//!
//! A `tracing` layer beside the one that writes the log: it formats each event the filter lets
//! through into one line and keeps the last few thousand. It sees what the log shows and
//! nothing more, so it holds no secret the log would not.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

/// Lines kept.
pub const LOG_RING_LINES: usize = 5000;

/// Characters kept of one line.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone)]
pub struct LogRing {
    lines: Arc<Mutex<VecDeque<String>>>,
    capacity: usize,
}

impl LogRing {
    pub fn new(capacity: usize) -> LogRing {
        LogRing {
            lines: Arc::new(Mutex::new(VecDeque::with_capacity(capacity.min(1024)))),
            capacity: capacity.max(1),
        }
    }

    /// The last `count` lines, oldest first.
    pub fn recent(&self, count: usize) -> Vec<String> {
        let Ok(lines) = self.lines.lock() else {
            return Vec::new();
        };
        let skip = lines.len().saturating_sub(count);
        lines.iter().skip(skip).cloned().collect()
    }

    fn push(&self, mut line: String) {
        if line.len() > MAX_LINE {
            let mut end = MAX_LINE;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
            line.push('…');
        }
        if let Ok(mut lines) = self.lines.lock() {
            if lines.len() == self.capacity {
                lines.pop_front();
            }
            lines.push_back(line);
        }
    }
}

struct LineVisitor {
    message: String,
    fields: String,
}

impl Visit for LineVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogRing {
    fn on_event(&self, event: &tracing::Event<'_>, _context: Context<'_, S>) {
        let mut visitor = LineVisitor {
            message: String::new(),
            fields: String::new(),
        };
        event.record(&mut visitor);
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let metadata = event.metadata();
        self.push(format!(
            "{}.{:03} {} {}: {}{}",
            at.as_secs(),
            at.subsec_millis(),
            metadata.level(),
            metadata.target(),
            visitor.message,
            visitor.fields
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn keeps_the_last_lines_formatted() {
        let ring = LogRing::new(2);
        let subscriber = tracing_subscriber::registry().with(ring.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(volume = "a", "first");
            tracing::warn!(count = 2, "second");
            tracing::info!("third");
        });
        let lines = ring.recent(10);
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].ends_with("WARN blockgate_gateway::control::log_ring::tests: second count=2"),
            "{lines:?}"
        );
        assert!(lines[1].ends_with(": third"), "{lines:?}");
        assert_eq!(ring.recent(1), lines[1..].to_vec());
    }
}
