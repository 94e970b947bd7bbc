//! The `vhost-user-blk ctl` client: sends one control request and renders the reply.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::protocol::{Reply, Request};
use crate::error::{Error, Result};

/// How long the client waits for the daemon's reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends `request` and returns the `result` of a successful reply.
pub fn call(socket: &Path, request: &Request) -> Result<Value> {
    let ctx = |e: io::Error| Error::io(format!("control socket {}", socket.display()), e);
    let mut conn = UnixStream::connect(socket).map_err(ctx)?;
    conn.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(ctx)?;
    let mut line = serde_json::to_string(request).map_err(Error::ControlEncode)?;
    line.push('\n');
    conn.write_all(line.as_bytes()).map_err(ctx)?;
    let mut reply = String::new();
    BufReader::new(&conn).read_line(&mut reply).map_err(ctx)?;
    let reply: Reply = serde_json::from_str(&reply).map_err(Error::ControlReply)?;
    if reply.ok {
        Ok(reply.result)
    } else {
        Err(Error::ControlRefused(
            reply.error.unwrap_or_else(|| "unknown error".into()),
        ))
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
        "{} disk, {} bytes{}, {}{}; flushes {}, last flush {}; uptime {:.0} s\n",
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
        // Older daemons have no `active`: say nothing rather than guess.
        if v["active"] == json!(false) {
            ", image inactive (handed over)"
        } else {
            ""
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

/// Renders a `bitmaps` result as a table: one row per bitmap (the fields of
/// [`crate::image::BitmapInfo`]), or one line saying there are none.
pub fn bitmaps_table(v: &Value) -> Result<String> {
    let bitmaps: Vec<Value> =
        serde_json::from_value(v["bitmaps"].clone()).map_err(Error::ControlReply)?;
    if bitmaps.is_empty() {
        return Ok("no persistent dirty bitmaps\n".into());
    }
    let name = |b: &Value| b["name"].as_str().unwrap_or("?").to_owned();
    let width = bitmaps
        .iter()
        .map(|b| name(b).chars().count())
        .max()
        .unwrap_or(0)
        .max("name".len());
    let yes_no = |v: &Value| if v == &json!(true) { "yes" } else { "no" };
    let mut out = format!(
        "{:<width$} {:>11} {:>7} {:>12} {:>14}\n",
        "name", "granularity", "enabled", "inconsistent", "dirty bytes"
    );
    for b in &bitmaps {
        out.push_str(&format!(
            "{:<width$} {:>11} {:>7} {:>12} {:>14}\n",
            name(b),
            num(&b["granularity"]),
            yes_no(&b["enabled"]),
            yes_no(&b["inconsistent"]),
            b["dirty_bytes"]
                .as_u64()
                .map_or_else(|| "-".to_owned(), |d| d.to_string()),
        ));
    }
    Ok(out)
}

/// `ctl watch`: refreshes the stats table once a second until interrupted.
pub fn watch(socket: &Path) -> Result<()> {
    let stats = Request::Stats { format: None };
    let mut prev = call(socket, &stats)?;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let cur = call(socket, &stats)?;
        let secs =
            cur["uptime_s"].as_f64().unwrap_or(1.0) - prev["uptime_s"].as_f64().unwrap_or(0.0);
        print!("\x1b[2J\x1b[H{}", stats_table(&cur, Some((&prev, secs))));
        io::stdout().flush().map_err(|e| Error::io("stdout", e))?;
        prev = cur;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_table_lists_each_bitmap() {
        let v = json!({"bitmaps": [
            {"name": "backup-0", "granularity": 65536, "enabled": true,
             "inconsistent": false, "dirty_bytes": 196608},
            {"name": "b", "granularity": 4096, "enabled": false,
             "inconsistent": true, "dirty_bytes": null},
        ]});
        assert_eq!(
            bitmaps_table(&v).unwrap(),
            "name     granularity enabled inconsistent    dirty bytes\n\
             backup-0       65536     yes           no         196608\n\
             b               4096      no          yes              -\n"
        );
        assert_eq!(
            bitmaps_table(&json!({"bitmaps": []})).unwrap(),
            "no persistent dirty bitmaps\n"
        );
        assert!(bitmaps_table(&json!({})).is_err());
    }
}
