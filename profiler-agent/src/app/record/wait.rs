//! Waiting for the end of a recording: the duration, Ctrl-C or SIGTERM.

use std::{
    io::{IsTerminal, Write},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

/// Waits for the duration, Ctrl-C or SIGTERM, showing progress when stderr
/// is a terminal.
pub async fn until_done(duration: Option<Duration>, started: Instant, progress: &AtomicU64) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let tty = std::io::stderr().is_terminal();
    let deadline = duration.map(|d| tokio::time::Instant::from_std(started + d));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    if !tty {
        let how_long = duration.map_or(String::new(), |d| format!(" for {d:.0?}"));
        eprintln!("Recording{how_long}; Ctrl-C stops and writes the profile.");
    }
    loop {
        tokio::select! {
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => break,
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = tick.tick() => {
                if tty {
                    let total = duration.map_or(String::new(), |d| format!(" / {}s", d.as_secs()));
                    eprint!("\rrecording: {}s{total}, {} samples   ", started.elapsed().as_secs(), progress.load(Ordering::Relaxed));
                    let _ = std::io::stderr().flush();
                }
            }
        }
    }
    if tty {
        eprintln!();
    }
    Ok(())
}
