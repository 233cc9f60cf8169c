//! The two programs the export bench profiles, compiled with gcc like the
//! integration tests' workloads (tests/src/workload.rs) and killed on drop.

use std::path::Path;

use anyhow::Result;

use crate::bench::workload::build;
pub use crate::bench::workload::Workload;

/// gcc flags that keep every frame on a frame-pointer-walkable stack (the
/// same as tests/src/workload.rs `C_FP_FLAGS`).
const C_FP_FLAGS: &[&str] =
    &["-O1", "-fno-omit-frame-pointer", "-mno-omit-leaf-frame-pointer", "-fno-optimize-sibling-calls", "-fno-inline"];

/// A few hot functions: `leaf_alpha`, `leaf_beta` and `leaf_gamma` (3:1:2 by
/// iteration count) under `middle` under `main`, forever. Like the tests'
/// FP_RATIO_C.
const CPU_C: &str = r#"
#include <stdint.h>

#define UNIT 1000000UL

/* A volatile local in every function: the loop cannot be deleted, and the
 * stack slot makes gcc give even a leaf a frame-pointer prologue. */
#define SPIN(n)                                  \
    volatile uint64_t acc = 0;                   \
    for (uint64_t i = 0; i < (n); i++) acc += i

__attribute__((noinline, aligned(64))) void leaf_alpha(uint64_t n) { SPIN(n); }
__attribute__((noinline, aligned(64))) void leaf_beta(uint64_t n) { SPIN(n); }
__attribute__((noinline, aligned(64))) void leaf_gamma(uint64_t n) { SPIN(n); }

__attribute__((noinline)) void middle(void) {
    volatile int calls = 0;
    leaf_alpha(3 * UNIT);
    leaf_beta(UNIT);
    leaf_gamma(2 * UNIT);
    calls++;
}

int main(void) {
    for (;;)
        middle();
}
"#;

/// Deep stacks: each of 256 "requests" (paths) recurses 40 to 100 frames deep
/// through six distinct functions, the callee at each level a fixed hash of
/// (path, depth), and ends in one of four leaves. So a path always gives the
/// same stack, and there are up to 256 different ones.
const DEEP_C: &str = r#"
#include <stdint.h>

#define NPATHS 256u
#define MIN_DEPTH 40u
#define DEPTH_SPAN 61u /* 40..100 */

/* A volatile local in every function: the stack slot makes gcc keep a
 * frame-pointer prologue everywhere, leaves included. */
#define SPIN(n)                                  \
    volatile uint64_t acc = 0;                   \
    for (uint64_t i = 0; i < (n); i++) acc += i

__attribute__((noinline)) void leaf_hash(uint32_t path) { SPIN(150000 + path % 7 * 10000); }
__attribute__((noinline)) void leaf_parse(uint32_t path) { SPIN(150000 + path % 5 * 20000); }
__attribute__((noinline)) void leaf_copy(uint32_t path) { SPIN(150000 + path % 3 * 30000); }
__attribute__((noinline)) void leaf_compress(uint32_t path) { SPIN(200000 + path % 2 * 50000); }

static void (*const LEAVES[4])(uint32_t) = {leaf_hash, leaf_parse, leaf_copy, leaf_compress};

typedef void (*step_fn)(uint32_t depth, uint32_t path);
void handle_request(uint32_t, uint32_t);
void dispatch_route(uint32_t, uint32_t);
void run_middleware(uint32_t, uint32_t);
void resolve_query(uint32_t, uint32_t);
void render_node(uint32_t, uint32_t);
void visit_child(uint32_t, uint32_t);
static const step_fn STEPS[6] = {handle_request, dispatch_route, run_middleware,
                                 resolve_query,  render_node,    visit_child};

/* Which function the frame at `depth` of `path` calls. */
__attribute__((noinline)) uint32_t pick(uint32_t path, uint32_t depth) {
    volatile uint32_t h = path * 2654435761u ^ depth * 0x9e3779b9u;
    uint32_t x = h;
    x ^= x >> 15;
    x *= 0x2c1b3c6du;
    x ^= x >> 12;
    return x % 6;
}

/* The store after the call keeps it from being a tail call. */
#define STEP(name)                                                       \
    __attribute__((noinline)) void name(uint32_t depth, uint32_t path) { \
        volatile uint32_t frame = depth;                                 \
        if (depth == 0)                                                  \
            LEAVES[path % 4](path);                                      \
        else                                                             \
            STEPS[pick(path, depth)](depth - 1, path);                   \
        frame++;                                                         \
    }

STEP(handle_request)
STEP(dispatch_route)
STEP(run_middleware)
STEP(resolve_query)
STEP(render_node)
STEP(visit_child)

int main(void) {
    volatile uint32_t seed = 1;
    for (;;) {
        seed = seed * 1103515245u + 12345u;
        uint32_t path = (seed >> 16) % NPATHS;
        STEPS[path % 6](MIN_DEPTH + path % DEPTH_SPAN, path);
    }
}
"#;

/// The workloads: (name, which is also the binary's name and comm; C source).
pub const WORKLOADS: [(&str, &str); 2] = [("exp-cpu", CPU_C), ("exp-deep", DEEP_C)];

/// Compiles `source` with `$CC` (default gcc) into `dir/name` and starts it.
pub fn start(name: &'static str, source: &str, dir: &Path) -> Result<Workload> {
    let bin = build(dir, name, "c", source, ("CC", "gcc"), C_FP_FLAGS)?;
    Workload::start(&bin, name, &[])
}
