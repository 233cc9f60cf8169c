//! Runtime names as written into perf maps, split into function and source
//! location where the runtime appends one, and which runtime a process is.

use std::sync::Arc;

use super::table::JitSymbol;
use crate::profile::JitRuntime;

/// The symbol for a perf-map name. V8 appends the location,
/// `JS:*fn /path/file.js:LINE:COL` (`*` optimized, `~` interpreted, `^`
/// baseline, `+` Maglev); CPython writes `py::qualname:/path/file.py`.
/// Other names are kept whole.
pub fn symbol(raw: &str) -> JitSymbol {
    let (name, file, line) = split(raw);
    JitSymbol { name: name.to_owned(), file: file.map(Arc::from), line, lines: Box::new([]) }
}

fn split(raw: &str) -> (&str, Option<&str>, Option<u32>) {
    if let Some((kind, _)) = raw.split_once(':') {
        if matches!(kind, "JS" | "LazyCompile" | "Function" | "Script" | "Eval") {
            if let Some((name, loc)) = raw.rsplit_once(' ') {
                if let Some((file, line)) = v8_location(loc) {
                    return (name, Some(file), Some(line));
                }
            }
        }
    }
    if let Some(rest) = raw.strip_prefix("py::") {
        if let Some((q, file)) = rest.split_once(':') {
            if !q.is_empty() && !file.is_empty() {
                return (&raw[..4 + q.len()], Some(file), None);
            }
        }
    }
    (raw, None, None)
}

/// `file:LINE:COL` or `file:LINE`.
fn v8_location(loc: &str) -> Option<(&str, u32)> {
    let (head, last) = loc.rsplit_once(':')?;
    let last_n: u32 = last.parse().ok()?;
    match head.rsplit_once(':') {
        Some((file, line)) if !file.is_empty() => line.parse().ok().map(|l| (file, l)),
        _ if !head.is_empty() => Some((head, last_n)),
        _ => None,
    }
}

/// Which runtime a process is, from its executable's name, so exporters can
/// mark its frames (OTLP `profile.frame.type`) and the summary can say which
/// flag writes a perf map.
pub fn runtime_of(exe_path: Option<&str>, comm: &str) -> JitRuntime {
    let base = exe_path.and_then(|p| p.rsplit('/').next()).unwrap_or(comm);
    if base == "node" || base == "nodejs" || base == "deno" || base == "bun" {
        JitRuntime::V8
    } else if base == "java" || comm == "java" {
        JitRuntime::Jvm
    } else if base == "dotnet" || base.starts_with("dotnet") {
        JitRuntime::Dotnet
    } else if base.starts_with("python") {
        JitRuntime::CPython
    } else {
        JitRuntime::Other
    }
}

/// What to tell a user whose process runs JIT code the agent cannot name.
pub fn hint(runtime: JitRuntime) -> &'static str {
    match runtime {
        JitRuntime::V8 => "run node with --perf-basic-prof (or --perf-prof for jitdump with line numbers)",
        JitRuntime::Jvm => {
            "run java with -XX:+PreserveFramePointer and write the map with `jcmd PID Compiler.perfmap` while it runs"
        }
        JitRuntime::Dotnet => "set DOTNET_PerfMapEnabled=1 (map and jitdump) or =3 (map only)",
        JitRuntime::CPython => "run python 3.12+ with -X perf (or 3.13+ -X perf_jit for jitdump)",
        JitRuntime::Other => "have the runtime write /tmp/perf-PID.map or a jitdump file (see its docs)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_v8_and_cpython_locations() {
        assert_eq!(split("JS:*hot /tmp/w.js:3:13"), ("JS:*hot", Some("/tmp/w.js"), Some(3)));
        assert_eq!(split("LazyCompile:~main /srv/x.js:10"), ("LazyCompile:~main", Some("/srv/x.js"), Some(10)));
        assert_eq!(split("JS:~ node:internal/main:1:1"), ("JS:~", Some("node:internal/main"), Some(1)));
        assert_eq!(split("Builtin:ArrayPush"), ("Builtin:ArrayPush", None, None));
        assert_eq!(split("JS:*f nofile"), ("JS:*f nofile", None, None));
        assert_eq!(split("py::spin:/srv/app.py"), ("py::spin", Some("/srv/app.py"), None));
        assert_eq!(split("LWork;::spin (30 bytes)"), ("LWork;::spin (30 bytes)", None, None));
    }

    #[test]
    fn knows_runtimes_by_executable() {
        assert_eq!(runtime_of(Some("/usr/bin/node"), "node"), JitRuntime::V8);
        assert_eq!(runtime_of(Some("/usr/lib/jvm/java-17-openjdk-amd64/bin/java"), "java"), JitRuntime::Jvm);
        assert_eq!(runtime_of(Some("/usr/bin/python3.13"), "python3"), JitRuntime::CPython);
        assert_eq!(runtime_of(None, "dotnet"), JitRuntime::Dotnet);
        assert_eq!(runtime_of(Some("/usr/bin/luajit"), "luajit"), JitRuntime::Other);
    }
}
