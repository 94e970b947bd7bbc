//! The control socket's wire format, shared by the server and the `ctl` client: JSON lines,
//! one [`Request`] per line from the client, one [`Reply`] per request from the daemon
//! (docs/CONTROL.md).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest request line accepted, newline included.
pub const MAX_LINE: u64 = 64 * 1024;

/// One request (`{"command": "stats", ...}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Counters and image figures.
    Stats {
        /// "json" (default) or "prometheus".
        #[serde(default, skip_serializing_if = "Option::is_none")]
        format: Option<String>,
    },
    /// Full write-back now. (Struct variants, so unknown fields are refused.)
    Flush {},
    /// Grow the disk.
    Resize {
        /// New size in bytes.
        size: u64,
    },
    /// List persistent dirty bitmaps.
    Bitmaps {},
    /// Clear a bitmap.
    BitmapClear {
        /// Bitmap name.
        name: String,
    },
    /// Take the image back for serving: reopen and relock it (migration handover).
    Activate {},
    /// Hand the image over: flush, close and unlock it; refused while a queue is started.
    Deactivate {},
}

/// One reply line: `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`.
///
/// The fields are declared in alphabetical order so that replies keep their keys sorted, as
/// they always have been.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Why the request failed (with `ok: false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the request succeeded.
    pub ok: bool,
    /// The request's result (with `ok: true`).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub result: Value,
}

impl Reply {
    /// A success carrying `result`.
    pub fn success(result: Value) -> Self {
        Reply {
            error: None,
            ok: true,
            result,
        }
    }

    /// A failure carrying `error`'s message.
    pub fn failure(error: impl std::fmt::Display) -> Self {
        Reply {
            error: Some(error.to_string()),
            ok: false,
            result: Value::Null,
        }
    }

    /// The reply as one line, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_else(|e| {
            // Serialising a struct of strings, bools and JSON values cannot fail; should it
            // ever, the client still gets a well-formed reply.
            format!(r#"{{"error":"cannot encode the reply: {e}","ok":false}}"#)
        });
        line.push('\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn replies_keep_their_keys_sorted() {
        assert_eq!(
            Reply::success(json!({"size": 1})).to_line(),
            "{\"ok\":true,\"result\":{\"size\":1}}\n"
        );
        assert_eq!(
            Reply::failure("too many control clients").to_line(),
            "{\"error\":\"too many control clients\",\"ok\":false}\n"
        );
    }

    #[test]
    fn requests_round_trip() {
        for (req, line) in [
            (Request::Stats { format: None }, r#"{"command":"stats"}"#),
            (Request::Flush {}, r#"{"command":"flush"}"#),
            (
                Request::Resize { size: 4096 },
                r#"{"command":"resize","size":4096}"#,
            ),
            (Request::Bitmaps {}, r#"{"command":"bitmaps"}"#),
            (
                Request::BitmapClear { name: "b".into() },
                r#"{"command":"bitmap-clear","name":"b"}"#,
            ),
            (Request::Activate {}, r#"{"command":"activate"}"#),
            (Request::Deactivate {}, r#"{"command":"deactivate"}"#),
        ] {
            assert_eq!(serde_json::to_string(&req).unwrap(), line);
            assert_eq!(serde_json::from_str::<Request>(line).unwrap(), req);
        }
    }

    #[test]
    fn handover_commands_take_no_parameters() {
        for line in [
            r#"{"command":"activate","force":true}"#,
            r#"{"command":"deactivate","queues":[0]}"#,
        ] {
            let e = serde_json::from_str::<Request>(line).unwrap_err();
            assert!(e.to_string().contains("unknown field"), "{line}: {e}");
        }
        // Command names are case-sensitive, like every other.
        assert!(serde_json::from_str::<Request>(r#"{"command":"Activate"}"#).is_err());
    }
}
