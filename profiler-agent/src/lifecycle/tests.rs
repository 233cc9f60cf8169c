use std::{fs, num::NonZeroUsize, path::Path, time::Instant};

use profiler_common::process::{EVENT_EXEC, EVENT_EXIT, EVENT_FORK};

use super::*;
use crate::{bpf::fake::FakeProcessEvents, process::LATEST_GENERATION};

fn fake_proc(dir: &Path, pid: u32, comm: &str, maps: &str) {
    let p = dir.join(pid.to_string());
    fs::create_dir_all(&p).unwrap();
    fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
    fs::write(p.join("maps"), maps).unwrap();
}

fn maps_line(start: u64, path: &str) -> String {
    format!("{start:x}-{:x} r-xp 00000000 00:00 0 {path}\n", start + 0x1000)
}

fn table(dir: &Path, capacity: usize) -> Arc<Mutex<ProcessTable>> {
    Arc::new(Mutex::new(ProcessTable::new(dir, NonZeroUsize::new(capacity).unwrap())))
}

/// A tracker whose thread is not running: events are applied by
/// `catch_up`, so the test controls the order.
fn tracker(events: &FakeProcessEvents, procs: &Arc<Mutex<ProcessTable>>) -> Tracker {
    Tracker::manual(events.clone(), procs.clone(), None, None)
}

#[test]
fn exec_captures_the_image_while_alive_and_samples_keep_their_image() {
    let dir = tempfile::tempdir().unwrap();
    fake_proc(dir.path(), 10, "sh", &maps_line(0x1000, "[sh-text]"));
    let procs = table(dir.path(), 16);
    let events = FakeProcessEvents::default();
    let t = tracker(&events, &procs);
    {
        let mut p = procs.lock().unwrap();
        assert_eq!(p.observe_at(10, 100, "sh"), 0, "first sight: generation 0");
    }
    // pid 10 execs `burn` at t=200 and has exited (its /proc entry gone)
    // by the time the samples are symbolized.
    fake_proc(dir.path(), 10, "burn", &maps_line(0x5000, "[burn-text]"));
    events.push(EVENT_EXEC, 10, 0, 200, "burn");
    t.catch_up();
    events.push(EVENT_EXIT, 10, 0, 300, "burn");
    t.catch_up();
    fs::remove_dir_all(dir.path().join("10")).unwrap();

    let mut p = procs.lock().unwrap();
    let before = p.observe_at(10, 150, "sh");
    let after = p.observe_at(10, 250, "burn");
    assert_eq!((before, after), (0, 1));
    let old = p.observe_generation(10, before, "");
    let new = p.observe_generation(10, after, "");
    assert_eq!(old.name, "sh");
    assert!(old.mapping(0x1800).is_some() && old.mapping(0x5800).is_none());
    assert_eq!(new.name, "burn");
    assert!(new.mapping(0x5800).is_some() && new.mapping(0x1800).is_none());
    assert_eq!(p.observe_generation(10, LATEST_GENERATION, "").name, "burn");
    // The old image is never refreshed with the new one's mappings.
    assert!(p.refresh_generation(10, before).is_none());
    drop(p);
    let stats = t.stop();
    assert_eq!((stats.execs, stats.exits, stats.forks), (1, 1, 0));
}

#[test]
fn a_fork_runs_the_parents_image_until_it_execs() {
    let dir = tempfile::tempdir().unwrap();
    fake_proc(dir.path(), 1, "shell", &maps_line(0x1000, "[shell]"));
    let procs = table(dir.path(), 16);
    let events = FakeProcessEvents::default();
    let t = tracker(&events, &procs);
    // The child's /proc entry is never read for the fork: it may already
    // show the next image.
    fake_proc(dir.path(), 2, "tool", &maps_line(0x9000, "[tool]"));
    events.push(EVENT_FORK, 2, 1, 50, "shell");
    events.push(EVENT_EXEC, 2, 0, 60, "tool");
    t.catch_up();
    let mut p = procs.lock().unwrap();
    let pre = p.observe_at(2, 55, "shell");
    let post = p.observe_at(2, 65, "tool");
    assert_eq!(p.observe_generation(2, pre, "").name, "shell");
    assert!(p.observe_generation(2, pre, "").mapping(0x1800).is_some());
    assert_eq!(p.observe_generation(2, post, "").name, "tool");
    assert!(p.observe_generation(2, post, "").mapping(0x9800).is_some());
    assert_eq!(p.stats().forks, 1);
}

#[test]
fn exited_processes_stay_until_swept_and_then_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let procs = table(dir.path(), 64);
    let events = FakeProcessEvents::default();
    let t = tracker(&events, &procs);
    for pid in 100..120 {
        fake_proc(dir.path(), pid, "short", &maps_line(0x1000, "[short]"));
        events.push(EVENT_EXEC, pid, 0, u64::from(pid), "short");
        events.push(EVENT_EXIT, pid, 0, u64::from(pid) + 1, "short");
    }
    t.catch_up();
    let swept_at = Instant::now();
    let mut p = procs.lock().unwrap();
    let s = p.stats();
    assert_eq!((s.entries, s.exited_pending), (20, 20), "kept for their samples");
    // Still symbolizable after /proc forgot them.
    fs::remove_dir_all(dir.path()).unwrap();
    assert_eq!(p.observe_generation(105, 0, "").mappings.len(), 1);
    assert_eq!(p.sweep_exited(swept_at), 20);
    let s = p.stats();
    assert_eq!((s.entries, s.exited_pending, s.exited_removed, s.evicted), (0, 0, 20, 0));
}

#[test]
fn a_sample_after_the_exit_is_a_new_process_on_a_reused_pid() {
    let dir = tempfile::tempdir().unwrap();
    fake_proc(dir.path(), 7, "old", &maps_line(0x1000, "[old]"));
    let procs = table(dir.path(), 8);
    let events = FakeProcessEvents::default();
    let t = tracker(&events, &procs);
    events.push(EVENT_EXEC, 7, 0, 10, "old");
    events.push(EVENT_EXIT, 7, 0, 20, "old");
    t.catch_up();
    fake_proc(dir.path(), 7, "new", &maps_line(0x2000, "[new]"));
    let mut p = procs.lock().unwrap();
    let g = p.observe_at(7, 30, "new");
    assert_eq!(p.observe_generation(7, g, "").name, "new");
    assert_eq!(p.stats().exited_pending, 0);
}

#[test]
fn the_table_stays_bounded_under_churn_and_counts_evictions() {
    let dir = tempfile::tempdir().unwrap();
    let procs = table(dir.path(), 8);
    let events = FakeProcessEvents::default();
    let t = tracker(&events, &procs);
    for pid in 1..=100u32 {
        events.push(EVENT_EXEC, pid, 0, u64::from(pid), "churn");
    }
    t.catch_up();
    let s = procs.lock().unwrap().stats();
    assert_eq!((s.entries, s.evicted, s.vanished), (8, 92, 100));
}

#[test]
fn execs_in_a_loop_keep_a_bounded_number_of_images() {
    let dir = tempfile::tempdir().unwrap();
    let procs = table(dir.path(), 8);
    let events = FakeProcessEvents::default();
    let t = tracker(&events, &procs);
    for i in 1..=10u64 {
        fake_proc(dir.path(), 3, &format!("img{i}"), "");
        events.push(EVENT_EXEC, 3, 0, i * 100, "x");
        t.catch_up();
    }
    let mut p = procs.lock().unwrap();
    let mut name_at = |t| {
        let g = p.observe_at(3, t, "");
        p.observe_generation(3, g, "").name.clone()
    };
    assert_eq!(name_at(1_000), "img10");
    assert_eq!(name_at(950), "img9");
    // Older than the images kept: the oldest kept one.
    assert_eq!(name_at(150), "img7");
}

#[test]
fn subscribers_see_every_event_after_the_table_has_it() {
    let dir = tempfile::tempdir().unwrap();
    fake_proc(dir.path(), 5, "app", &maps_line(0x1000, "[app]"));
    let procs = table(dir.path(), 8);
    let events = FakeProcessEvents::default();
    let t = Tracker::start(events.clone(), procs.clone(), None, None).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let (seen, procs) = (seen.clone(), procs.clone());
        t.subscribe(Box::new(move |e| {
            let known = procs.lock().unwrap().get(5).is_some();
            seen.lock().unwrap().push((e.clone(), known));
        }));
    }
    events.push(EVENT_EXEC, 5, 0, 1, "app");
    events.push(EVENT_EXIT, 5, 0, 2, "app");
    events.push(99, 5, 0, 3, "bogus");
    // The thread picks them up on its own (timer poll without a fd).
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    while seen.lock().unwrap().len() < 2 && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            (LifecycleEvent::Exec { pid: 5, comm: "app".into(), time_ns: 1 }, true),
            (LifecycleEvent::Exit { pid: 5, time_ns: 2 }, true)
        ]
    );
}

#[test]
fn libraries_mapped_after_the_exec_are_read_shortly_after() {
    let dir = tempfile::tempdir().unwrap();
    let procs = table(dir.path(), 8);
    let events = FakeProcessEvents::default();
    let t = tracker(&events, &procs);
    // At the exec only the executable is mapped; the loader maps libc next.
    fake_proc(dir.path(), 4, "app", &maps_line(0x1000, "[app]"));
    events.push(EVENT_EXEC, 4, 0, 1, "app");
    t.catch_up();
    assert!(procs.lock().unwrap().get(4).unwrap().mapping(0x7000_0800).is_none());
    fake_proc(dir.path(), 4, "app", &(maps_line(0x1000, "[app]") + &maps_line(0x7000_0000, "[libc]")));
    std::thread::sleep(RELOAD_AFTER + std::time::Duration::from_millis(5));
    t.catch_up();
    let p = procs.lock().unwrap().get(4).unwrap();
    assert!(p.mapping(0x7000_0800).is_some(), "re-read after the exec");
    assert!(p.mapping(0x1800).is_some());
}

#[test]
fn exited_processes_never_sampled_go_first() {
    let dir = tempfile::tempdir().unwrap();
    let procs = table(dir.path(), 16);
    let events = FakeProcessEvents::default();
    let t = tracker(&events, &procs);
    for pid in [21, 22] {
        fake_proc(dir.path(), pid, "p", &maps_line(0x1000, "[p]"));
        events.push(EVENT_EXEC, pid, 0, 10, "p");
    }
    t.catch_up();
    procs.lock().unwrap().observe_at(22, 15, "p");
    events.push(EVENT_EXIT, 21, 0, 20, "p");
    events.push(EVENT_EXIT, 22, 0, 20, "p");
    t.catch_up();
    let mut p = procs.lock().unwrap();
    assert_eq!(p.sweep_unsampled(Instant::now()), 1);
    assert!(p.get(21).is_none(), "no sample waits for it");
    assert!(p.get(22).is_some(), "its sample is not symbolized yet");
    assert_eq!(p.sweep_exited(Instant::now()), 1);
    assert!(p.is_empty());
}

#[test]
fn a_process_found_gone_is_not_kept_as_live_and_is_read_once_per_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let procs = table(dir.path(), 8);
    let mut p = procs.lock().unwrap();
    assert_eq!(p.observe(9, "late").name, "late");
    assert_eq!(p.observe(9, "late").name, "late");
    let s = p.stats();
    assert_eq!((s.entries, s.vanished), (0, 1), "not in the table, read once");
    // After a sweep the pid may be a new process.
    p.sweep_exited(Instant::now());
    fake_proc(dir.path(), 9, "new", "");
    assert_eq!(p.observe(9, "").name, "new");
    assert_eq!(p.stats().entries, 1);
}

#[test]
fn with_a_fixed_pid_list_other_processes_are_counted_but_not_read() {
    let dir = tempfile::tempdir().unwrap();
    fake_proc(dir.path(), 10, "sh", &maps_line(0x1000, "[sh-text]"));
    fake_proc(dir.path(), 20, "other", &maps_line(0x2000, "[other-text]"));
    let procs = table(dir.path(), 16);
    let events = FakeProcessEvents::default();
    let t = Tracker::manual(events.clone(), procs.clone(), None, Some(&[10]));
    procs.lock().unwrap().observe_at(10, 100, "sh");
    fake_proc(dir.path(), 10, "burn", &maps_line(0x5000, "[burn-text]"));
    events.push(EVENT_EXEC, 10, 0, 200, "burn");
    events.push(EVENT_FORK, 21, 20, 210, "other");
    events.push(EVENT_EXEC, 20, 0, 220, "other");
    t.catch_up();
    let mut p = procs.lock().unwrap();
    assert_eq!(p.observe_at(10, 250, "burn"), 1, "the listed process's exec is applied");
    let st = p.stats();
    assert_eq!((st.entries, st.execs, st.forks), (1, 1, 0), "nothing was recorded for pids 20 and 21: {st:?}");
    drop(p);
    let stats = t.stop();
    assert_eq!((stats.execs, stats.forks, stats.untracked), (2, 1, 2));
}
