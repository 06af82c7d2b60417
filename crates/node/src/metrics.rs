//! `--metrics-addr`: the node's event stream as OpenMetrics text, for
//! operators who run headless nodes under Prometheus.
//!
//! It is a third renderer of the same `NodeEvent`s the log and the desktop
//! app show, so the numbers cannot disagree. The HTTP side is deliberately
//! tiny (one GET route, bounded request size): a metrics port must never be a
//! way to hurt the node.

use std::{collections::BTreeMap, fmt::Write as _, sync::Arc, sync::Mutex};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::events::{NodeEvent, NodeState};

/// Largest request head read from a scraper.
const MAX_REQUEST: usize = 8 * 1024;

#[derive(Clone, Debug, Default)]
struct NodeStats {
    state: Option<NodeState>,
    round: Option<u64>,
    rounds_applied: u64,
    updates_applied: u64,
    bytes_up: u64,
    bytes_down: u64,
    tokens_trained: u64,
    run_tokens: Option<u64>,
    loss: Option<f32>,
    eval_loss: Option<f32>,
    rejected: u64,
    dropped: u64,
    diverged: u64,
    month_bytes: Option<u64>,
    monthly_cap: Option<u64>,
    up_cap: Option<f64>,
    down_cap: Option<f64>,
}

/// Counters and gauges per node, fed from events.
#[derive(Debug, Default)]
pub struct Metrics {
    nodes: Mutex<BTreeMap<String, NodeStats>>,
}

impl Metrics {
    /// Fold one event into the numbers.
    pub fn observe(&self, event: &NodeEvent) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let node = match event {
            NodeEvent::State { node, .. }
            | NodeEvent::Joined { node, .. }
            | NodeEvent::RoundOpened { node, .. }
            | NodeEvent::Trained { node, .. }
            | NodeEvent::RoundApplied { node, .. }
            | NodeEvent::Rejected { node, .. }
            | NodeEvent::Dropped { node, .. }
            | NodeEvent::Diverged { node, .. }
            | NodeEvent::Evaluated { node, .. }
            | NodeEvent::Fetching { node, .. }
            | NodeEvent::Peers { node, .. }
            | NodeEvent::Checkpoint { node, .. }
            | NodeEvent::Usage { node, .. }
            | NodeEvent::Warning { node, .. }
            | NodeEvent::Caps { node, .. } => node,
        };
        let s = nodes.entry(node.clone()).or_default();
        match event {
            NodeEvent::State { state, .. } => s.state = Some(*state),
            NodeEvent::Trained { tokens, .. } => s.tokens_trained += tokens,
            NodeEvent::RoundApplied {
                round,
                updates,
                loss,
                eval_loss,
                bytes_up,
                bytes_down,
                run_tokens,
                ..
            } => {
                s.round = Some(*round);
                s.run_tokens = Some(*run_tokens);
                s.rounds_applied += 1;
                s.updates_applied += *updates as u64;
                s.bytes_up += bytes_up;
                s.bytes_down += bytes_down;
                s.loss = loss.or(s.loss);
                s.eval_loss = eval_loss.or(s.eval_loss);
            }
            NodeEvent::Rejected { .. } => s.rejected += 1,
            NodeEvent::Dropped { .. } => s.dropped += 1,
            NodeEvent::Diverged { .. } => s.diverged += 1,
            NodeEvent::Evaluated { eval_loss, .. } => s.eval_loss = Some(*eval_loss),
            NodeEvent::Usage { up, down, cap, .. } => {
                s.month_bytes = Some(up + down);
                s.monthly_cap = *cap;
            }
            NodeEvent::Caps {
                up_mbit, down_mbit, ..
            } => {
                s.up_cap = *up_mbit;
                s.down_cap = *down_mbit;
            }
            _ => {}
        }
    }

    /// The OpenMetrics exposition.
    pub fn render(&self) -> String {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let mut family =
            |name: &str, kind: &str, help: &str, value: &dyn Fn(&NodeStats) -> Option<f64>| {
                let samples: Vec<(String, f64)> = nodes
                    .iter()
                    .filter_map(|(n, s)| value(s).map(|v| (n.clone(), v)))
                    .collect();
                if samples.is_empty() {
                    return;
                }
                let _ = writeln!(out, "# TYPE starling_{name} {kind}");
                let _ = writeln!(out, "# HELP starling_{name} {help}");
                let suffix = if kind == "counter" { "_total" } else { "" };
                for (node, v) in samples {
                    let _ = writeln!(out, "starling_{name}{suffix}{{node=\"{node}\"}} {v}");
                }
            };
        let n = |v: u64| Some(v as f64);
        family("round", "gauge", "Last round applied.", &|s| {
            s.round.map(|r| r as f64)
        });
        family("rounds_applied", "counter", "Rounds applied.", &|s| {
            n(s.rounds_applied)
        });
        family(
            "updates_applied",
            "counter",
            "Peer updates applied.",
            &|s| n(s.updates_applied),
        );
        family(
            "bytes_sent",
            "counter",
            "Bytes sent (blob traffic).",
            &|s| n(s.bytes_up),
        );
        family(
            "bytes_received",
            "counter",
            "Bytes received (blob traffic).",
            &|s| n(s.bytes_down),
        );
        family(
            "tokens_trained",
            "counter",
            "Tokens this node trained on.",
            &|s| n(s.tokens_trained),
        );
        family(
            "run_tokens",
            "gauge",
            "Tokens the whole run has trained on (from the coordinator's last manifest).",
            &|s| s.run_tokens.map(|t| t as f64),
        );
        family(
            "loss",
            "gauge",
            "Mean training loss of the last applied round.",
            &|s| s.loss.map(f64::from),
        );
        family("eval_loss", "gauge", "Last held-out loss.", &|s| {
            s.eval_loss.map(f64::from)
        });
        family(
            "rejected",
            "counter",
            "Updates or messages refused.",
            &|s| n(s.rejected),
        );
        family(
            "dropped",
            "counter",
            "Members removed after repeated faults.",
            &|s| n(s.dropped),
        );
        family(
            "diverged",
            "counter",
            "Weight digests that disagreed.",
            &|s| n(s.diverged),
        );
        family(
            "upload_cap_mbit",
            "gauge",
            "Upload cap in Mbit/s (absent: unlimited).",
            &|s| s.up_cap,
        );
        family(
            "download_cap_mbit",
            "gauge",
            "Download cap in Mbit/s (absent: unlimited).",
            &|s| s.down_cap,
        );
        family(
            "month_bytes",
            "gauge",
            "Bytes moved this calendar month.",
            &|s| s.month_bytes.map(|b| b as f64),
        );
        family("monthly_cap_bytes", "gauge", "Monthly data cap.", &|s| {
            s.monthly_cap.map(|b| b as f64)
        });
        family(
            "paused",
            "gauge",
            "1 while participation is paused.",
            &|s| {
                s.state
                    .map(|st| if st == NodeState::Paused { 1.0 } else { 0.0 })
            },
        );
        out.push_str("# EOF\n");
        out
    }
}

/// Answer `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
                match tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
            let (status, kind, body) = if line.starts_with(b"GET /metrics ") {
                (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics.render(),
                )
            } else {
                (
                    "404 Not Found",
                    "text/plain; charset=utf-8",
                    "try /metrics\n".to_string(),
                )
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_become_openmetrics_over_http() {
        let metrics = Arc::new(Metrics::default());
        metrics.observe(&NodeEvent::RoundApplied {
            node: "n1".into(),
            round: 4,
            updates: 3,
            loss: Some(2.5),
            eval_loss: None,
            digest: 1,
            bytes_up: 100,
            bytes_down: 200,
            allreduce_bytes: 4000,
            tokens: 256,
            run_tokens: 1280,
        });
        metrics.observe(&NodeEvent::RoundApplied {
            node: "n1".into(),
            round: 5,
            updates: 3,
            loss: None,
            eval_loss: Some(2.25),
            digest: 2,
            bytes_up: 10,
            bytes_down: 20,
            allreduce_bytes: 4000,
            tokens: 256,
            run_tokens: 1536,
        });
        let text = metrics.render();
        assert!(text.contains("starling_round{node=\"n1\"} 5\n"), "{text}");
        assert!(
            text.contains("starling_bytes_sent_total{node=\"n1\"} 110\n"),
            "{text}"
        );
        assert!(
            text.contains("starling_updates_applied_total{node=\"n1\"} 6\n"),
            "{text}"
        );
        assert!(text.contains("starling_loss{node=\"n1\"} 2.5\n"), "{text}");
        assert!(
            text.contains("starling_run_tokens{node=\"n1\"} 1536\n"),
            "{text}"
        );
        assert!(
            text.contains("starling_eval_loss{node=\"n1\"} 2.25\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, metrics));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("starling_bytes_received_total{node=\"n1\"} 220"),
            "{ok}"
        );
        assert!(get("/").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
