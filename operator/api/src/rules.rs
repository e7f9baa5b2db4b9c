//! The field rules of the custom resources, written once and applied twice: as CEL rules in
//! the CRD schema (so the API server rejects a bad object with a clear message and stores
//! nothing) and as Rust checks in the `validate()` methods (so the operator can re-check what
//! it reads and explain a failure in a condition).
//!
//! Every regular expression here is used verbatim by CEL's `matches()` (RE2) and by the
//! `regex` crate. They avoid backslashes and quotes so they embed in a CEL string literal
//! unchanged (`[.]` rather than an escaped dot).

use std::fmt;
use std::sync::OnceLock;

use kube::core::{Message, Rule};
use regex::Regex;

/// One rule broken by a spec: the field's path as the API server would print it
/// (`spec.objectStore.bucket`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the offending field from the object root, e.g. `spec.writeLog.size`.
    pub field: String,
    /// What the field must be, e.g. `must be at least 1Gi`.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A spec that breaks one or more rules. All broken rules are listed, not just the first,
/// so one round of fixes is enough.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid spec: {}", join(.0))]
pub struct InvalidSpec(pub Vec<FieldError>);

impl InvalidSpec {
    /// Whether some error is about exactly this field.
    pub fn names(&self, field: &str) -> bool {
        self.0.iter().any(|e| e.field == field)
    }
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Collects field errors while walking a spec.
#[derive(Debug, Default)]
pub(crate) struct Findings(Vec<FieldError>);

impl Findings {
    pub(crate) fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    pub(crate) fn into_result(self) -> Result<(), InvalidSpec> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(InvalidSpec(self.0))
        }
    }
}

/// A string field's syntax: a regular expression and the message shown when it does not
/// match. The message says what is expected, with an example, because that is what a user
/// needs when `kubectl apply` fails.
#[derive(Debug)]
pub struct StringFormat {
    /// RE2/`regex` syntax, anchored.
    pub regex: &'static str,
    /// Shown by the API server after the field's path, and by `validate()`.
    pub message: &'static str,
    compiled: OnceLock<Regex>,
}

impl StringFormat {
    const fn new(regex: &'static str, message: &'static str) -> Self {
        Self {
            regex,
            message,
            compiled: OnceLock::new(),
        }
    }

    /// The CEL rule for the schema.
    pub fn rule(&self) -> Rule {
        Rule::new(format!("self.matches('{}')", self.regex))
            .message(Message::Message(self.message.to_owned()))
    }

    /// Whether `value` has this syntax.
    pub fn matches(&self, value: &str) -> bool {
        self.compiled
            .get_or_init(|| {
                // The patterns are constants of this module and a test compiles every one,
                // so this cannot fail at run time.
                Regex::new(self.regex).expect("StringFormat regexes are valid")
            })
            .is_match(value)
    }

    pub(crate) fn check(&self, findings: &mut Findings, field: &str, value: &str) -> bool {
        let ok = self.matches(value);
        if !ok {
            findings.push(field, self.message);
        }
        ok
    }
}

/// A CEL rule with a message, for the schema.
pub(crate) fn rule(expression: &str, message: &str) -> Rule {
    Rule::new(expression).message(Message::Message(message.to_owned()))
}

/// A Kubernetes object name (DNS-1123 subdomain), for Secret references.
pub static SECRET_NAME: StringFormat = StringFormat::new(
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    "must be the name of a Secret in this namespace: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit",
);

/// A key inside a Secret's data.
pub static SECRET_KEY: StringFormat = StringFormat::new(
    "^[-._a-zA-Z0-9]+$",
    "must be a key of the Secret's data: letters, digits, '-', '_' and '.'",
);

/// An image repository without tag or digest: the tag is `spec.version`, so one field
/// drives rollouts.
pub static IMAGE_REPOSITORY: StringFormat = StringFormat::new(
    "^[a-z0-9]([a-z0-9._-]*[a-z0-9])?(:[0-9]+)?(/[a-z0-9]([a-z0-9._-]*[a-z0-9])?)*$",
    "must be an image repository without tag or digest, for example ghcr.io/blockgate/gateway (the tag is spec.version)",
);

/// A semantic version, used as the image tag and to order rollouts.
pub static VERSION: StringFormat = StringFormat::new(
    "^[0-9]+[.][0-9]+[.][0-9]+(-[0-9A-Za-z.-]+)?$",
    "must be a semantic version such as 0.4.1 or 0.5.0-rc.1; it is also the image tag",
);

/// An absolute directory on the node, without a trailing slash.
pub static NODE_PATH: StringFormat = StringFormat::new(
    "^(/[^/]+)+$",
    "must be an absolute path on the node without a trailing slash, for example /var/lib/blockgate/write-log",
);

/// CEL for "no `.` or `..` segment": a pattern cannot say it without look-around.
pub(crate) const NODE_PATH_SEGMENTS_CEL: &str =
    "!(self + '/').contains('/./') && !(self + '/').contains('/../')";
pub(crate) const NODE_PATH_SEGMENTS_MESSAGE: &str = "must not contain '.' or '..' segments";

/// Whether a node path is free of `.` and `..` segments (the Rust side of
/// [`NODE_PATH_SEGMENTS_CEL`]).
pub(crate) fn node_path_segments_ok(path: &str) -> bool {
    let with_slash = format!("{path}/");
    !with_slash.contains("/./") && !with_slash.contains("/../")
}

/// Longest node path accepted; bounds CEL cost.
pub const NODE_PATH_MAX_LENGTH: u32 = 1024;

/// A size (see [`crate::quantity`]).
pub static SIZE: StringFormat = StringFormat::new(
    crate::quantity::SIZE_REGEX,
    "must be a size such as 100Gi or 500G: a number with an optional suffix Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P or E",
);

/// CEL for "`self.size` is at least `minimum`", on a [`crate::storage_gateway::LocalStorage`]
/// (the rule sits on the object so it can be reported at `.size` through `fieldPath`). It is
/// guarded so a size with bad syntax reports only the syntax rule rather than a `quantity()`
/// evaluation error.
pub(crate) fn size_field_at_least(minimum: &str) -> Rule {
    rule(
        &format!(
            "!self.size.matches('{}') || quantity(self.size).compareTo(quantity('{minimum}')) >= 0",
            crate::quantity::SIZE_REGEX
        ),
        &format!("must be at least {minimum}"),
    )
    .field_path(".size")
}

/// CEL for "this size string is at least `minimum`", guarded like [`size_field_at_least`].
pub(crate) fn size_at_least(minimum: &str, message: &str) -> Rule {
    rule(
        &format!(
            "!self.matches('{}') || quantity(self).compareTo(quantity('{minimum}')) >= 0",
            crate::quantity::SIZE_REGEX
        ),
        message,
    )
}

/// An S3 bucket name per the S3 naming rules (3 to 63 characters; lowercase letters,
/// digits, dots and hyphens; starting and ending with a letter or digit). The rules a
/// pattern cannot express are in [`BUCKET_EXTRA_CEL`].
pub static BUCKET: StringFormat = StringFormat::new(
    "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
    "must be an S3 bucket name: 3 to 63 lowercase letters, digits, '.' and '-', starting and ending with a letter or digit",
);

/// The S3 bucket rules beyond [`BUCKET`]: no adjacent dots or dot-hyphen pairs, not an IP
/// address, no reserved prefix or suffix.
pub(crate) const BUCKET_EXTRA_CEL: &str = "!self.contains('..') && !self.contains('.-') && !self.contains('-.') && !self.matches('^[0-9]+[.][0-9]+[.][0-9]+[.][0-9]+$') && !self.startsWith('xn--') && !self.startsWith('sthree-') && !self.endsWith('-s3alias') && !self.endsWith('--ol-s3')";
pub(crate) const BUCKET_EXTRA_MESSAGE: &str = "must be an S3 bucket name: no '..', '.-' or '-.', not an IP address, not starting with 'xn--' or 'sthree-', not ending with '-s3alias' or '--ol-s3'";

/// The Rust side of [`BUCKET_EXTRA_CEL`].
pub(crate) fn bucket_extra_ok(bucket: &str) -> bool {
    static IP: StringFormat = StringFormat::new("^[0-9]+[.][0-9]+[.][0-9]+[.][0-9]+$", "");
    !(bucket.contains("..")
        || bucket.contains(".-")
        || bucket.contains("-.")
        || IP.matches(bucket)
        || bucket.starts_with("xn--")
        || bucket.starts_with("sthree-")
        || bucket.ends_with("-s3alias")
        || bucket.ends_with("--ol-s3"))
}

/// A key prefix inside the bucket: no leading slash, no empty segment, characters that S3
/// keys can hold without escaping.
pub static KEY_PREFIX: StringFormat = StringFormat::new(
    "^([A-Za-z0-9!_.*()-]+/)*[A-Za-z0-9!_.*()-]*$",
    "must be an object key prefix such as clusters/prod/: letters, digits and !_.*()- separated by single '/', not starting with '/'",
);

/// An S3 endpoint URL. CEL additionally checks it with `isURL()`. IPv6 literals
/// (`http://[::1]`) are not accepted: a bracket cannot be written portably for both RE2 and
/// the `regex` crate without a backslash; use a host name.
pub static ENDPOINT: StringFormat = StringFormat::new(
    "^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[^ ?#]*)?$",
    "must be an http:// or https:// URL with a host and optional port and path, for example https://s3.example.com:9000",
);

/// A region name (`us-east-1`, or whatever an S3-compatible server calls its region).
pub static REGION: StringFormat = StringFormat::new(
    "^[A-Za-z0-9][A-Za-z0-9_-]*$",
    "must be a region name such as us-east-1 (use the S3 server's exact region)",
);

/// A time of day, `HH:MM` on the 24-hour clock.
pub static TIME_OF_DAY: StringFormat = StringFormat::new(
    "^([01][0-9]|2[0-3]):[0-5][0-9]$",
    "must be a time of day HH:MM on the 24-hour clock, for example 02:30",
);

/// The end of a schedule interval: a time of day, or `24:00` for the end of the day.
pub static END_OF_INTERVAL: StringFormat = StringFormat::new(
    "^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$",
    "must be a time of day HH:MM on the 24-hour clock, or 24:00 for the end of the day",
);

/// A window length in hours and minutes (`2h`, `90m`, `1h30m`), as Go and CEL write them.
pub static WINDOW_DURATION: StringFormat = StringFormat::new(
    "^([0-9]{1,2}h([0-9]{1,4}m)?|[0-9]{1,4}m)$",
    "must be a duration in hours and minutes such as 4h, 90m or 1h30m",
);

/// A maintenance window lasts from half an hour (enough to update a node) to a full day.
pub(crate) const WINDOW_DURATION_RANGE_CEL: &str = "!self.matches('^([0-9]{1,2}h([0-9]{1,4}m)?|[0-9]{1,4}m)$') || (duration(self) >= duration('30m') && duration(self) <= duration('24h'))";
pub(crate) const WINDOW_DURATION_RANGE_MESSAGE: &str = "must be between 30m and 24h";
/// Bounds of [`WINDOW_DURATION_RANGE_CEL`], in minutes.
pub(crate) const WINDOW_MINUTES: std::ops::RangeInclusive<u32> = 30..=24 * 60;

/// Minutes in a [`WINDOW_DURATION`] string, or `None` when it has another syntax.
pub(crate) fn window_minutes(text: &str) -> Option<u32> {
    if !WINDOW_DURATION.matches(text) {
        return None;
    }
    let (hours, minutes) = match text.split_once('h') {
        Some((hours, rest)) => (hours.parse::<u32>().ok()?, rest.trim_end_matches('m')),
        None => (0, text.trim_end_matches('m')),
    };
    let minutes = if minutes.is_empty() {
        0
    } else {
        minutes.parse::<u32>().ok()?
    };
    hours.checked_mul(60)?.checked_add(minutes)
}

/// An IANA time zone name (`UTC`, `Europe/Berlin`, `America/Argentina/Buenos_Aires`). The
/// schema checks the shape only: whether the zone exists in the time zone database is the
/// reconciler's check, reported in a condition.
pub static TIME_ZONE: StringFormat = StringFormat::new(
    "^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$",
    "must be an IANA time zone name such as UTC or Europe/Berlin",
);

/// `maxUnavailable`: a count of at least 1 or a percentage from 1% to 100%. Written with
/// `string(self)` rather than the `type(self) == int` of the Kubernetes docs so that kube's
/// client-side CEL evaluator can check it in tests; as a consequence a count written as a
/// string (`"2"`) is accepted too, and [`crate::storage_gateway::UpdatePolicy`] reads it as a
/// count.
pub(crate) const MAX_UNAVAILABLE_CEL: &str =
    "string(self).matches('^[1-9][0-9]{0,5}$') || string(self).matches('^([1-9][0-9]?|100)%$')";
pub(crate) const MAX_UNAVAILABLE_MESSAGE: &str =
    "must be a number of gateways of at least 1, or a percentage from 1% to 100%";
pub(crate) static PERCENTAGE: StringFormat =
    StringFormat::new("^([1-9][0-9]?|100)%$", MAX_UNAVAILABLE_MESSAGE);
pub(crate) static COUNT: StringFormat =
    StringFormat::new("^[1-9][0-9]{0,5}$", MAX_UNAVAILABLE_MESSAGE);

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [&StringFormat; 16] = [
        &COUNT,
        &SECRET_NAME,
        &SECRET_KEY,
        &IMAGE_REPOSITORY,
        &VERSION,
        &NODE_PATH,
        &SIZE,
        &BUCKET,
        &KEY_PREFIX,
        &ENDPOINT,
        &REGION,
        &TIME_OF_DAY,
        &END_OF_INTERVAL,
        &WINDOW_DURATION,
        &TIME_ZONE,
        &PERCENTAGE,
    ];

    #[test]
    fn every_regex_compiles_and_embeds_in_a_cel_string() {
        for format in ALL {
            Regex::new(format.regex).unwrap();
            assert!(
                !format.regex.contains('\\') && !format.regex.contains('\''),
                "{}",
                format.regex
            );
            assert!(format.regex.starts_with('^') && format.regex.ends_with('$'));
        }
    }

    #[test]
    fn window_minutes_reads_hours_and_minutes() {
        assert_eq!(window_minutes("4h"), Some(240));
        assert_eq!(window_minutes("90m"), Some(90));
        assert_eq!(window_minutes("1h30m"), Some(90));
        assert_eq!(window_minutes("24h"), Some(1440));
        assert_eq!(window_minutes("0m"), Some(0));
        assert_eq!(window_minutes(""), None);
        assert_eq!(window_minutes("1h30"), None);
        assert_eq!(window_minutes("1.5h"), None);
        assert_eq!(window_minutes("30s"), None);
    }

    #[test]
    fn bucket_rules() {
        for good in ["my-bucket", "abc", "a.b.c", "bucket-1.example"] {
            assert!(BUCKET.matches(good) && bucket_extra_ok(good), "{good}");
        }
        for bad in ["ab", "My-Bucket", "-bucket", "bucket-", "a_b"] {
            assert!(!BUCKET.matches(bad), "{bad}");
        }
        for bad in [
            "a..b",
            "a.-b",
            "a-.b",
            "192.168.5.4",
            "xn--abc",
            "sthree-x",
            "b-s3alias",
            "b--ol-s3",
        ] {
            assert!(!bucket_extra_ok(bad), "{bad}");
        }
    }

    #[test]
    fn node_paths() {
        for good in ["/var/lib/blockgate", "/mnt/cache-1", "/a"] {
            assert!(
                NODE_PATH.matches(good) && node_path_segments_ok(good),
                "{good}"
            );
        }
        for bad in ["", "/", "relative/path", "/var/lib/", "/var//lib"] {
            assert!(!NODE_PATH.matches(bad), "{bad}");
        }
        for bad in ["/var/../etc", "/var/.", "/./x", "/a/.."] {
            assert!(!node_path_segments_ok(bad), "{bad}");
        }
        assert!(node_path_segments_ok("/var/.hidden/x..y"));
    }

    #[test]
    fn invalid_spec_lists_every_error() {
        let mut findings = Findings::default();
        findings.push("spec.a", "must be x");
        findings.push("spec.b", "must be y");
        let error = findings.into_result().unwrap_err();
        assert!(error.names("spec.a") && error.names("spec.b") && !error.names("spec"));
        assert_eq!(
            error.to_string(),
            "invalid spec: spec.a: must be x; spec.b: must be y"
        );
    }
}
