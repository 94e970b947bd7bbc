//! The control socket's server: serves [`Request`]s from each client on its own thread.
//!
//! Each line a client sends is one request; each gets exactly one [`Reply`] line. A
//! malformed line gets an error reply and the connection stays open. The control socket never
//! touches the I/O path: it reads the per-queue atomics and calls the image's own thread-safe
//! operations (flush, resize), or the device's handover (activate, deactivate).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use log::{info, warn};
use serde_json::{json, Value};

use super::protocol::{Reply, Request, MAX_LINE};
use crate::device::{DeactivateError, Device, Transition};
use crate::stats::{now_ns, Histogram, ReqKind};
use crate::sync::lock;
use crate::virtio_blk::config::SECTOR_SHIFT;

/// Most control connections served at once.
pub const MAX_CLIENTS: usize = 16;

/// Why a control request failed; its text is the reply's `error` (docs/CONTROL.md lists
/// them).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The line is not a valid request.
    #[error("bad request: {0}")]
    BadRequest(serde_json::Error),
    /// The line is longer than [`MAX_LINE`].
    #[error("request longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// [`MAX_CLIENTS`] clients are connected already.
    #[error("too many control clients")]
    TooManyClients,
    /// `stats` with a format other than json or prometheus.
    #[error("unknown stats format '{0}'")]
    UnknownStatsFormat(String),
    /// The image could not be flushed.
    #[error("flush failed: {0}")]
    Flush(io::Error),
    /// The bitmap could not be cleared.
    #[error("bitmap-clear: {0}")]
    BitmapClear(io::Error),
    /// A resize of a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// A resize to a smaller size.
    #[error("shrinking is refused ({size} < current {current} bytes)")]
    Shrink {
        /// The size asked for.
        size: u64,
        /// The current size.
        current: u64,
    },
    /// A resize to a size that is not a whole number of logical blocks.
    #[error("size {size} is not a multiple of the {block}-byte logical block size")]
    Unaligned {
        /// The size asked for.
        size: u64,
        /// The logical block size.
        block: u64,
    },
    /// The image could not be grown.
    #[error("resize failed: {0}")]
    Resize(io::Error),
    /// The image could not be reopened and locked (another process holds it, ...).
    #[error("activate failed: {0}")]
    Activate(crate::error::Error),
    /// The image was not handed over (queues started, or the close failed).
    #[error("deactivate {0}")]
    Deactivate(DeactivateError),
}

/// Serves the control socket on a background thread.
pub fn spawn(listener: UnixListener, device: Arc<Device>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || accept_loop(listener, device))?;
    Ok(())
}

fn accept_loop(listener: UnixListener, device: Arc<Device>) {
    let clients = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!("control socket accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::AcqRel);
            let _ = reply_line(&conn, &Reply::failure(ControlError::TooManyClients));
            continue;
        }
        let (d, c) = (device.clone(), clients.clone());
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                if let Err(e) = serve_client(conn, &d) {
                    info!("control client: {e}");
                }
                c.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            warn!("cannot start a control client thread: {e}");
            clients.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn reply_line(mut conn: &UnixStream, reply: &Reply) -> io::Result<()> {
    conn.write_all(reply.to_line().as_bytes())
}

fn serve_client(conn: UnixStream, device: &Device) -> io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        let n = (&mut reader).take(MAX_LINE).read_until(b'\n', &mut raw)?;
        if n == 0 {
            return Ok(());
        }
        // Invalid UTF-8 becomes replacement characters, which the JSON parser then rejects
        // with an error reply.
        let line = String::from_utf8_lossy(&raw);
        if !line.ends_with('\n') && n as u64 >= MAX_LINE {
            reply_line(&conn, &Reply::failure(ControlError::LineTooLong))?;
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        reply_line(&conn, &handle_line(device, &line))?;
    }
}

/// Parses and executes one request line, returning the reply.
pub fn handle_line(device: &Device, line: &str) -> Reply {
    let result = serde_json::from_str::<Request>(line)
        .map_err(ControlError::BadRequest)
        .and_then(|req| execute(device, req));
    match result {
        Ok(result) => Reply::success(result),
        Err(e) => Reply::failure(e),
    }
}

fn execute(device: &Device, req: Request) -> Result<Value, ControlError> {
    match req {
        Request::Stats { format } => match format.as_deref() {
            None | Some("json") => Ok(stats_json(device)),
            Some("prometheus") => Ok(Value::String(prometheus(device))),
            Some(other) => Err(ControlError::UnknownStatsFormat(other.to_owned())),
        },
        Request::Flush {} => {
            device.flush().map_err(ControlError::Flush)?;
            Ok(json!({}))
        }
        Request::Resize { size } => resize(device, size),
        Request::Bitmaps {} => Ok(json!({ "bitmaps": device.image().bitmaps() })),
        Request::BitmapClear { name } => {
            device
                .image()
                .clear_bitmap(&name)
                .map_err(ControlError::BitmapClear)?;
            Ok(json!({}))
        }
        Request::Activate {} => {
            let t = device.activate_now().map_err(ControlError::Activate)?;
            Ok(json!({"active": true, "changed": t == Transition::Changed}))
        }
        Request::Deactivate {} => {
            let t = device.deactivate_idle().map_err(ControlError::Deactivate)?;
            Ok(json!({"active": false, "changed": t == Transition::Changed}))
        }
    }
}

fn resize(device: &Device, size: u64) -> Result<Value, ControlError> {
    // Check and grow under one lock: two clients resizing at once must not shrink the file
    // behind a capacity the guest was already told about.
    let _guard = lock(&device.resize_lock);
    let current = device.params.capacity_sectors() << SECTOR_SHIFT;
    let lbs = u64::from(device.params.logical_block_size);
    if device.params.read_only {
        return Err(ControlError::ReadOnly);
    }
    if size < current {
        return Err(ControlError::Shrink { size, current });
    }
    if !size.is_multiple_of(lbs) {
        return Err(ControlError::Unaligned { size, block: lbs });
    }
    if size > current {
        device.image().resize(size).map_err(ControlError::Resize)?;
        device.params.set_capacity_sectors(size >> SECTOR_SHIFT);
        info!("disk resized from {current} to {size} bytes");
    }
    let notified = match device.notify_config_change() {
        Ok(n) => n,
        Err(e) => {
            warn!("telling the frontend about the new size failed: {e}");
            false
        }
    };
    Ok(json!({"size": size, "previous_size": current, "frontend_notified": notified}))
}

fn age_s(ns: u64) -> Option<f64> {
    (ns != 0).then(|| now_ns().saturating_sub(ns) as f64 / 1e9)
}

fn stats_json(device: &Device) -> Value {
    let mut queues = Vec::new();
    let mut last_flush = device.last_host_flush_ns.load(Ordering::Relaxed);
    let mut guest_flushes = 0;
    for (i, q) in device.queues.iter().enumerate() {
        let mut requests = serde_json::Map::new();
        for k in ReqKind::ALL {
            requests.insert(k.name().into(), json!(q.requests(k)));
        }
        guest_flushes += q.requests(ReqKind::Flush);
        last_flush = last_flush.max(q.last_flush_ns.load(Ordering::Relaxed));
        let h = q.latency.snapshot();
        queues.push(json!({
            "queue": i,
            "requests": requests,
            "bytes_read": q.bytes_read.load(Ordering::Relaxed),
            "bytes_written": q.bytes_written.load(Ordering::Relaxed),
            "errors": q.errors.load(Ordering::Relaxed),
            "dropped": q.dropped.load(Ordering::Relaxed),
            "in_flight": q.in_flight.load(Ordering::Relaxed),
            "latency_us": {
                "p50": Histogram::quantile(&h, 0.5) as f64 / 1000.0,
                "p99": Histogram::quantile(&h, 0.99) as f64 / 1000.0,
                "p99.9": Histogram::quantile(&h, 0.999) as f64 / 1000.0,
            },
        }));
    }
    let img = device.image();
    json!({
        "uptime_s": device.started.elapsed().as_secs_f64(),
        "connected": device.connected(),
        "active": device.is_active(),
        "image": {
            "format": img.format_name(),
            "virtual_size": device.params.capacity_sectors() << SECTOR_SHIFT,
            "read_only": device.params.read_only,
            "flushes": guest_flushes + device.host_flushes.load(Ordering::Relaxed),
            "seconds_since_last_flush": age_s(last_flush),
            "details": img.stats(),
        },
        "queues": queues,
    })
}

/// The counters in the Prometheus text exposition format.
pub fn prometheus(device: &Device) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        out.push_str(&format!("# HELP vhost_user_blk_{name} {help}\n"));
        out.push_str(&format!("# TYPE vhost_user_blk_{name} {kind}\n"));
        for (labels, v) in rows {
            out.push_str(&format!("vhost_user_blk_{name}{labels} {v}\n"));
        }
    };
    let qs = &device.queues;
    let per_q = |f: &dyn Fn(usize) -> f64| -> Vec<(String, f64)> {
        (0..qs.len())
            .map(|i| (format!("{{queue=\"{i}\"}}"), f(i)))
            .collect()
    };
    let mut reqs = Vec::new();
    for (i, q) in qs.iter().enumerate() {
        for k in ReqKind::ALL {
            reqs.push((
                format!("{{queue=\"{i}\",kind=\"{}\"}}", k.name()),
                q.requests(k) as f64,
            ));
        }
    }
    metric("requests_total", "counter", "Completed requests.", reqs);
    metric(
        "read_bytes_total",
        "counter",
        "Bytes read by the guest.",
        per_q(&|i| qs[i].bytes_read.load(Ordering::Relaxed) as f64),
    );
    metric(
        "written_bytes_total",
        "counter",
        "Bytes written by the guest.",
        per_q(&|i| qs[i].bytes_written.load(Ordering::Relaxed) as f64),
    );
    metric(
        "errors_total",
        "counter",
        "Requests completed with IOERR or UNSUPP.",
        per_q(&|i| qs[i].errors.load(Ordering::Relaxed) as f64),
    );
    metric(
        "in_flight",
        "gauge",
        "Requests being executed.",
        per_q(&|i| qs[i].in_flight.load(Ordering::Relaxed) as f64),
    );
    let mut lat = Vec::new();
    for (i, q) in qs.iter().enumerate() {
        let h = q.latency.snapshot();
        for (label, p) in [("0.5", 0.5), ("0.99", 0.99), ("0.999", 0.999)] {
            lat.push((
                format!("{{queue=\"{i}\",quantile=\"{label}\"}}"),
                Histogram::quantile(&h, p) as f64 / 1e9,
            ));
        }
    }
    metric(
        "latency_seconds",
        "summary",
        "Request completion latency.",
        lat,
    );
    metric(
        "virtual_size_bytes",
        "gauge",
        "Size of the disk the guest sees.",
        vec![(
            String::new(),
            (device.params.capacity_sectors() << SECTOR_SHIFT) as f64,
        )],
    );
    out
}
