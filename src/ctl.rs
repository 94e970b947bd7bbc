//! The `vhost-user-blk ctl` client: sends one control request and prints the reply.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// Sends `request` and returns the `result` of a successful reply.
pub fn call(socket: &Path, request: &Value) -> Result<Value> {
    let ctx = |e: io::Error| Error::io(format!("control socket {}", socket.display()), e);
    let mut conn = UnixStream::connect(socket).map_err(ctx)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(ctx)?;
    let mut line = request.to_string();
    line.push('\n');
    conn.write_all(line.as_bytes()).map_err(ctx)?;
    let mut reply = String::new();
    BufReader::new(&conn).read_line(&mut reply).map_err(ctx)?;
    let v: Value = serde_json::from_str(&reply)
        .map_err(|e| Error::Control(format!("bad reply from the daemon: {e}")))?;
    if v["ok"] == json!(true) {
        Ok(v["result"].clone())
    } else {
        Err(Error::Control(format!(
            "daemon refused: {}",
            v["error"].as_str().unwrap_or("unknown error")
        )))
    }
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Renders a `stats` result as a table. With `prev` (the result `interval` seconds earlier),
/// rates are shown instead of totals.
pub fn stats_table(v: &Value, prev: Option<(&Value, f64)>) -> String {
    let img = &v["image"];
    let mut out = format!(
        "{} disk, {} bytes{}, {}; flushes {}, last flush {}; uptime {:.0} s\n",
        img["format"].as_str().unwrap_or("?"),
        num(&img["virtual_size"]),
        if img["read_only"] == json!(true) {
            " (read-only)"
        } else {
            ""
        },
        if v["connected"] == json!(true) {
            "frontend connected"
        } else {
            "no frontend"
        },
        num(&img["flushes"]),
        img["seconds_since_last_flush"]
            .as_f64()
            .map(|s| format!("{s:.1} s ago"))
            .unwrap_or_else(|| "never".into()),
        v["uptime_s"].as_f64().unwrap_or(0.0),
    );
    if let Some(details) = img["details"].as_object() {
        let parts: Vec<String> = details
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        if !parts.is_empty() {
            out.push_str(&format!("image: {}\n", parts.join(", ")));
        }
    }
    let rate = prev.is_some();
    out.push_str(&format!(
        "{:>5} {:>10} {:>10} {:>8} {:>8} {:>8} {:>10} {:>10} {:>6} {:>4} {:>9} {:>9} {:>9}\n",
        "queue",
        if rate { "reads/s" } else { "reads" },
        if rate { "writes/s" } else { "writes" },
        "flushes",
        "discards",
        "wzeroes",
        if rate { "rd MiB/s" } else { "rd MiB" },
        if rate { "wr MiB/s" } else { "wr MiB" },
        "errors",
        "infl",
        "p50 us",
        "p99 us",
        "p99.9 us"
    ));
    let empty = Vec::new();
    let queues = v["queues"].as_array().unwrap_or(&empty);
    for (i, q) in queues.iter().enumerate() {
        let pq = prev.and_then(|(p, _)| p["queues"].get(i));
        let secs = prev.map(|(_, s)| s).unwrap_or(1.0).max(1e-9);
        let val = |f: &dyn Fn(&Value) -> u64| -> f64 {
            match pq {
                Some(p) => f(q).saturating_sub(f(p)) as f64 / secs,
                None => f(q) as f64,
            }
        };
        let r = &q["requests"];
        let total: u64 = r
            .as_object()
            .map(|m| m.values().map(num).sum())
            .unwrap_or(0);
        if total == 0 && !rate {
            continue;
        }
        out.push_str(&format!(
            "{:>5} {:>10.0} {:>10.0} {:>8.0} {:>8.0} {:>8.0} {:>10.1} {:>10.1} {:>6} {:>4} {:>9.1} {:>9.1} {:>9.1}\n",
            i,
            val(&|q| num(&q["requests"]["read"])),
            val(&|q| num(&q["requests"]["write"])),
            val(&|q| num(&q["requests"]["flush"])),
            val(&|q| num(&q["requests"]["discard"])),
            val(&|q| num(&q["requests"]["write_zeroes"])),
            val(&|q| num(&q["bytes_read"])) / 1048576.0,
            val(&|q| num(&q["bytes_written"])) / 1048576.0,
            num(&q["errors"]),
            num(&q["in_flight"]),
            q["latency_us"]["p50"].as_f64().unwrap_or(0.0),
            q["latency_us"]["p99"].as_f64().unwrap_or(0.0),
            q["latency_us"]["p99.9"].as_f64().unwrap_or(0.0),
        ));
    }
    out
}

/// `ctl watch`: refreshes the stats table once a second until interrupted.
pub fn watch(socket: &Path) -> Result<()> {
    let mut prev = call(socket, &json!({"command": "stats"}))?;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let cur = call(socket, &json!({"command": "stats"}))?;
        let secs =
            cur["uptime_s"].as_f64().unwrap_or(1.0) - prev["uptime_s"].as_f64().unwrap_or(0.0);
        print!("\x1b[2J\x1b[H{}", stats_table(&cur, Some((&prev, secs))));
        io::stdout().flush().map_err(|e| Error::io("stdout", e))?;
        prev = cur;
    }
}
