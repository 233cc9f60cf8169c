//! The table and target lines of `bench offcpu`.

use std::collections::BTreeMap;

use super::{
    Round, Traced, LOADS, OVERHEAD_RATE, TARGET_NS_PER_SWITCH, TARGET_OVERHEAD_PCT, TARGET_THROUGHPUT,
    TARGET_VS_BPFTRACE,
};

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
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

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "unknown",
    }
}

fn row(load: &str, phase: &str, runs: &[&Traced], ratio: Option<f64>) {
    let ops = median(runs.iter().map(|t| t.load.round_trips_per_sec()).collect());
    let sw = median(runs.iter().map(|t| t.load.switches_per_sec()).collect());
    let cpu = median(runs.iter().filter_map(|t| t.cpu_during_load).collect());
    let ns = median(runs.iter().filter_map(|t| t.bpf_ns_per_switch()).collect());
    let bpf_pct =
        median(runs.iter().filter_map(|t| Some(t.bpf_during_load? as f64 / 1e9 / t.load.secs * 100.0)).collect());
    println!(
        "{load:<8} {phase:<15} {:>12} {:>11} {:>7} {:>9} {:>11} {:>9}",
        fmt(ops, 0),
        fmt(sw, 0),
        fmt(ratio, 3),
        fmt(cpu, 2),
        fmt(ns, 0),
        fmt(bpf_pct, 2)
    );
}

pub fn report(rounds: &[Round], ncpu: usize, cpu: usize, duration: u64, has_bpftrace: bool) {
    println!();
    println!(
        "Off-CPU tracing cost: loads pinned to CPU {cpu} ({ncpu} CPUs), {duration} s per run, {} rounds; medians.",
        rounds.len()
    );
    println!(
        "{:<8} {:<15} {:>12} {:>11} {:>7} {:>9} {:>11} {:>9}",
        "load", "phase", "round trips/s", "switches/s", "ratio", "CPU %", "BPF ns/sw", "BPF %"
    );
    let mut max_ratio = None;
    let mut quiet_ratio = None;
    let mut stats_stuck = false;
    let mut vs_bpftrace = None;
    let mut agent_ns: Vec<(&str, Option<f64>)> = Vec::new();
    for (i, load) in LOADS.iter().enumerate() {
        let base: Vec<f64> = rounds.iter().map(|r| r.loads[i].base.round_trips_per_sec()).collect();
        let base_sw = median(rounds.iter().map(|r| r.loads[i].base.switches_per_sec()).collect());
        println!(
            "{load:<8} {:<15} {:>12} {:>11} {:>7} {:>9} {:>11} {:>9}",
            "baseline",
            fmt(median(base.clone()), 0),
            fmt(base_sw, 0),
            "1",
            "-",
            "-",
            "-"
        );
        let agent: Vec<&Traced> = rounds.iter().map(|r| &r.loads[i].agent).collect();
        // Ratios per round (baseline and traced run of the same round).
        let ratio_of =
            |runs: &[&Traced]| median(runs.iter().zip(&base).map(|(t, b)| t.load.round_trips_per_sec() / b).collect());
        let agent_ratio = ratio_of(&agent);
        row(load, "profiler-agent", &agent, agent_ratio);
        let quiet: Vec<&Traced> = rounds.iter().filter_map(|r| r.loads[i].agent_quiet.as_ref().map(|q| &q.0)).collect();
        if !quiet.is_empty() {
            row(load, "agent, no stats", &quiet, ratio_of(&quiet));
            if rounds.iter().any(|r| r.loads[i].agent_quiet.as_ref().is_some_and(|q| !q.1)) {
                stats_stuck = true;
            }
        }
        let bt: Vec<&Traced> = rounds.iter().filter_map(|r| r.loads[i].bpftrace.as_ref()).collect();
        if !bt.is_empty() {
            row(load, "bpftrace", &bt, ratio_of(&bt));
        }
        agent_ns.push((load, median(agent.iter().filter_map(|t| ns_per_switch(&t.bpf)).collect())));
        if *load == "max" {
            max_ratio = agent_ratio;
            quiet_ratio = ratio_of(&quiet);
            // Agent BPF time over bpftrace's, per round.
            vs_bpftrace = median(
                rounds
                    .iter()
                    .filter_map(|r| {
                        let p = &r.loads[i];
                        Some(p.agent.bpf_ns_per_switch()? / p.bpftrace.as_ref()?.bpf_ns_per_switch()?)
                    })
                    .collect(),
            );
        }
    }
    let over: Vec<&Traced> = rounds.iter().map(|r| &r.overhead).collect();
    row("overhead", "profiler-agent", &over, None);
    println!(
        "(ratio: round trips/s against the baseline of the same round; CPU %: the tracer's user+sys during the \
         load, /proc/PID/stat; BPF ns/sw and BPF %: its programs' run time during the load (fdinfo) per context \
         switch of the whole machine and in % of one core. BPF time is charged to the traced tasks, not the tracer. \
         agent, no stats: the same agent with the kernel's BPF statistics off, as in production.)"
    );
    if stats_stuck {
        println!(
            "Warning: BPF statistics stayed on during the \"no stats\" phase (the sysctl \
             kernel.bpf_stats_enabled is 1): that phase is not what it says; set it to 0 and rerun."
        );
    }
    for r in rounds.iter().take(1) {
        let names: Vec<String> =
            r.loads[1].agent.bpf.iter().map(|(n, (ns, runs))| format!("{n} {ns} ns x {runs}")).collect();
        println!("profiler-agent BPF per run on the multi-site load (round 1): {}", names.join(", "));
    }
    for (load, ns) in agent_ns {
        println!(
            "Target: (sched_switch + sched_wakeup BPF time) / switches <= {TARGET_NS_PER_SWITCH} ns on {load}: {} ns ({})",
            fmt(ns, 0),
            verdict(ns.map(|v| v <= TARGET_NS_PER_SWITCH))
        );
    }
    // Judged with statistics off (the module comment says why); with
    // them on where that phase is missing.
    let judged = if stats_stuck { None } else { quiet_ratio };
    println!(
        "Target: flat out (max) throughput >= {TARGET_THROUGHPUT}x the baseline, BPF statistics off: {}x ({}); \
         with them on: {}x",
        fmt(judged, 3),
        verdict(judged.map(|v| v >= TARGET_THROUGHPUT)),
        fmt(max_ratio, 3)
    );
    if has_bpftrace {
        println!(
            "Target: flat out (max) BPF time <= {TARGET_VS_BPFTRACE}x bpftrace's: {}x ({})",
            fmt(vs_bpftrace, 3),
            verdict(vs_bpftrace.map(|v| v <= TARGET_VS_BPFTRACE))
        );
    } else {
        println!("bpftrace not installed (apt-get install bpftrace): its comparison skipped");
    }
    let whole_cpu = median(over.iter().map(|t| t.m.cpu.as_secs_f64()).collect());
    let rss = median(over.iter().map(|t| t.m.rss_kb as f64 / 1024.0).collect());
    println!(
        "Overhead run, the agent's whole run (start-up, table loading and writing included): {} s CPU, peak RSS {} MB",
        fmt(whole_cpu, 2),
        fmt(rss, 1)
    );
    let total = median(over.iter().filter_map(|t| t.total_pct()).collect());
    let rate = median(over.iter().map(|t| t.load.switches_per_sec()).collect());
    println!(
        "Target: agent + BPF CPU at 99 Hz + off-CPU over a CPU-bound process and a multi-site service \
         (~{:.0}k switches/s asked, {} reached) <= {TARGET_OVERHEAD_PCT} % of one core: {} % ({})",
        OVERHEAD_RATE / 1e3,
        fmt(rate, 0),
        fmt(total, 2),
        verdict(total.map(|v| v <= TARGET_OVERHEAD_PCT))
    );
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
