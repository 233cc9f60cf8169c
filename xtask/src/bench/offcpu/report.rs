//! The table and target lines of `bench offcpu`.

use std::collections::BTreeMap;

use super::{pingpong::LoadRun, Round, Traced, LOADS, TARGET_LOSS_PCT, TARGET_NS_PER_SWITCH, TARGET_RATE};

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

fn loss_pct(base: &LoadRun, with: &LoadRun) -> f64 {
    (1.0 - with.round_trips_per_sec() / base.round_trips_per_sec()) * 100.0
}

/// (switch time + wakeup time) / switches, from one agent summary.
pub fn ns_per_switch(bpf: &BTreeMap<String, (u64, u64)>) -> Option<f64> {
    let (sw_ns, sw_runs) = *bpf.get("sched_switch")?;
    let (wk_ns, wk_runs) = bpf.get("sched_wakeup").copied().unwrap_or((0, 0));
    (sw_runs > 0).then(|| (sw_ns * sw_runs + wk_ns * wk_runs) as f64 / sw_runs as f64)
}

fn fmt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.prec$}"))
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

pub fn report(rounds: &[Round], ncpu: usize, cpu: usize, duration: u64, has_bpftrace: bool) {
    println!();
    println!(
        "Off-CPU tracing cost: pipe ping-pong between two processes pinned to CPU {cpu} ({ncpu} CPUs), \
         {duration} s per load run, {} rounds; medians, per-round values in brackets.",
        rounds.len()
    );
    println!(
        "{:<6} {:<15} {:>13} {:>12} {:>8} {:>11} {:>11}",
        "load", "phase", "round trips/s", "switches/s", "loss %", "CPU % run", "CPU % load"
    );
    let mut tracers: Vec<(&str, Vec<&Traced>)> = vec![("profiler-agent", rounds.iter().map(|r| &r.agent).collect())];
    if has_bpftrace {
        tracers.push(("bpftrace", rounds.iter().filter_map(|r| r.bpftrace.as_ref()).collect()));
    }
    let mut losses = BTreeMap::new();
    for (i, load) in LOADS.iter().enumerate() {
        let base: Vec<&LoadRun> = rounds.iter().map(|r| &r.base[i]).collect();
        let rt = |runs: &[&LoadRun]| median(runs.iter().map(|r| r.round_trips_per_sec()).collect());
        let sw = |runs: &[&LoadRun]| median(runs.iter().map(|r| r.switches_per_sec()).collect());
        let each = |runs: &[&LoadRun]| {
            let v: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.round_trips_per_sec())).collect();
            v.join(" ")
        };
        println!(
            "{load:<6} {:<15} {:>13} {:>12} {:>8} {:>11} {:>11}  [{}]",
            "baseline",
            fmt(rt(&base), 0),
            fmt(sw(&base), 0),
            "-",
            "-",
            "-",
            each(&base)
        );
        for (tool, runs) in &tracers {
            let with: Vec<&LoadRun> = runs.iter().map(|t| &t.loads[i]).collect();
            let per_round: Vec<f64> = base.iter().zip(&with).map(|(b, w)| loss_pct(b, w)).collect();
            let loss = median(per_round.clone());
            losses.insert((*load, *tool), (loss, sw(&base)));
            let cpu_run = median(runs.iter().map(|t| t.m.cpu.as_secs_f64() / t.m.wall.as_secs_f64() * 100.0).collect());
            let cpu_load = median(runs.iter().filter_map(|t| t.cpu_during_load).collect());
            let lr: Vec<String> = per_round.iter().map(|l| format!("{l:.1}%")).collect();
            println!(
                "{load:<6} {tool:<15} {:>13} {:>12} {:>8} {:>11} {:>11}  [{}; loss {}]",
                fmt(rt(&with), 0),
                fmt(sw(&with), 0),
                fmt(loss, 1),
                fmt(cpu_run, 2),
                fmt(cpu_load, 2),
                each(&with),
                lr.join(" ")
            );
        }
    }
    println!("(CPU % run: user+sys over the tracer's whole run (both loads) from wait4, incl. start-up and writing; CPU % load: during the loads, /proc/PID/stat; % of one core. BPF time is charged to the traced tasks, not the tracer.)");

    let agent: Vec<&Traced> = rounds.iter().map(|r| &r.agent).collect();
    let mut names: Vec<&String> = agent.iter().flat_map(|t| t.bpf.keys()).collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        println!("BPF per run: the agent printed no \"BPF time per run\" line (were BPF statistics on?)");
    } else {
        let items: Vec<String> = names
            .iter()
            .map(|n| {
                let ns = median(agent.iter().filter_map(|t| t.bpf.get(*n)).map(|p| p.0 as f64).collect());
                let runs = median(agent.iter().filter_map(|t| t.bpf.get(*n)).map(|p| p.1 as f64).collect());
                format!("{n} {} ns x {}", fmt(ns, 0), fmt(runs, 0))
            })
            .collect();
        println!("profiler-agent BPF per run (median of rounds): {}", items.join(", "));
    }
    let total = median(agent.iter().filter_map(|t| t.m.bpf_ns.checked_div(t.m.bpf_runs).map(|n| n as f64)).collect());
    println!("profiler-agent BPF per run over all its programs (fdinfo): {} ns", fmt(total, 0));
    let per_switch = median(agent.iter().filter_map(|t| ns_per_switch(&t.bpf)).collect());
    println!(
        "Target: (sched_switch + sched_wakeup BPF time) / switches <= {TARGET_NS_PER_SWITCH} ns: {} ns ({})",
        fmt(per_switch, 0),
        per_switch.map_or("unknown", |v| verdict(v <= TARGET_NS_PER_SWITCH))
    );
    if let Some(ns) = per_switch {
        println!("  = {:.2} % of one core at {:.0}k switches/s", ns * TARGET_RATE / 1e7, TARGET_RATE / 1e3);
    }
    for load in LOADS {
        let Some(&(loss, rate)) = losses.get(&(load, "profiler-agent")) else {
            continue;
        };
        let rate_s = fmt(rate, 0);
        match load {
            "paced" => println!(
                "Target: throughput loss <= {TARGET_LOSS_PCT} % at {:.0}k switches/s: {} % at {rate_s} switches/s reached ({})",
                TARGET_RATE / 1e3,
                fmt(loss, 1),
                loss.map_or("unknown", |l| verdict(l <= TARGET_LOSS_PCT))
            ),
            _ => println!(
                "Flat out (worst case, not a target): {} % throughput loss at {rate_s} switches/s",
                fmt(loss, 1)
            ),
        }
    }
    if !has_bpftrace {
        println!("bpftrace not installed: skipped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
