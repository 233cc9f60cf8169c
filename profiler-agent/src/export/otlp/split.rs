//! Splitting one interval's profiles into requests a receiver accepts.
//!
//! gRPC servers refuse messages above 4 MiB unless configured otherwise
//! (grpc-go's and tonic's default, so the Collector's OTLP receiver's too),
//! and the limit applies to the decompressed message. One interval of about
//! 10k active processes reaches it. A request over [`MAX_REQUEST_BYTES`] is
//! split by process: each part carries whole processes and a dictionary of
//! only what they use, so every part stands alone and the receiver sees the
//! same resources, samples and values as one request would have carried.
//! Parts are delivered (and retried) one by one.

use std::collections::BTreeSet;

use prost::Message as _;

use super::profiles::{encode_pids, pids, Resource};
use super::ExportProfilesServiceRequest;
use crate::profile::Profile;

/// The largest encoded request sent as is: gRPC's default 4 MiB receive
/// limit, less headroom for the receiver's own framing.
pub const MAX_REQUEST_BYTES: usize = (4 << 20) - (64 << 10);

/// `profiles` as requests of at most `max_bytes` each (encoded), by process;
/// one request when it fits. A single process larger than `max_bytes` is
/// sent alone, whatever its size: it cannot be split without breaking its
/// profile apart.
pub fn encode_split(profiles: &[&Profile], resource: &Resource, max_bytes: usize) -> Vec<ExportProfilesServiceRequest> {
    let whole = encode_pids(profiles, resource, None);
    let len = whole.encoded_len();
    if len <= max_bytes {
        return vec![whole];
    }
    let pids = pids(profiles);
    // Guess the part count from the size (dictionaries are shared less, so
    // parts come out a little larger than len/parts), then halve any part
    // that still does not fit.
    let parts = len.div_ceil(max_bytes) + 1;
    let chunk = pids.len().div_ceil(parts).max(1);
    let mut out = Vec::with_capacity(parts);
    for group in pids.chunks(chunk) {
        split_into(profiles, resource, group, max_bytes, &mut out);
    }
    out
}

fn split_into(
    profiles: &[&Profile],
    resource: &Resource,
    group: &[u32],
    max_bytes: usize,
    out: &mut Vec<ExportProfilesServiceRequest>,
) {
    let only: BTreeSet<u32> = group.iter().copied().collect();
    let req = encode_pids(profiles, resource, Some(&only));
    if req.encoded_len() <= max_bytes || group.len() == 1 {
        if group.len() == 1 && req.encoded_len() > max_bytes {
            log::warn!(
                "the profile of process {} alone is {} bytes, over the {max_bytes}-byte request limit; sent as is",
                group[0],
                req.encoded_len()
            );
        }
        out.push(req);
        return;
    }
    let (a, b) = group.split_at(group.len() / 2);
    split_into(profiles, resource, a, max_bytes, out);
    split_into(profiles, resource, b, max_bytes, out);
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    use super::*;
    use crate::profile::{Frame, FrameKind, Module, ProfileBuilder, Sample, ValueType};

    /// `processes` processes, each with `stacks` samples through distinct
    /// functions of its own binary: the dictionary grows with the process
    /// count, as it does on a busy host. `pad` lengthens every function name
    /// (C++ and Rust names run long), so few processes make a big request.
    pub(crate) fn many_processes(processes: u32, stacks: u32, pad: usize) -> Profile {
        let pad = "x".repeat(pad);
        let mut p = Profile::new(
            ValueType::new("samples", "count"),
            Some(ValueType::new("cpu", "nanoseconds")),
            10_000_000,
            SystemTime::UNIX_EPOCH,
        );
        p.duration_ns = 10_000_000_000;
        let mut b = ProfileBuilder::default();
        for pid in 1..=processes {
            let module = b.module(&mut p, Module { path: format!("/srv/app-{pid}/bin/service"), build_id: None });
            let main = b.frame(&mut p, frame(&format!("service_{pid}::main{pad}"), module, 0x1000));
            for s in 0..stacks {
                let name = format!("service_{pid}::handler_{s}{pad}");
                let leaf = b.frame(&mut p, frame(&name, module, 0x2000 + u64::from(s)));
                p.samples.push(Sample {
                    pid,
                    tid: pid,
                    process_name: format!("service-{pid}"),
                    thread_name: "worker".into(),
                    cpu: Some(0),
                    frames: vec![leaf, main],
                    value: u64::from(pid % 7 + s + 1),
                    labels: Vec::new(),
                });
            }
        }
        p
    }

    fn frame(function: &str, module: usize, address: u64) -> Frame {
        Frame {
            function: function.into(),
            file: None,
            line: None,
            module: Some(module),
            address,
            kind: FrameKind::User,
            unsymbolized: false,
        }
    }

    /// (pid, leaf function) -> value, resolved through each request's own dictionary.
    pub(crate) fn values(reqs: &[ExportProfilesServiceRequest]) -> BTreeMap<(i64, String), i64> {
        let mut out = BTreeMap::new();
        for req in reqs {
            let d = req.dictionary.as_ref().expect("dictionary");
            for rp in &req.resource_profiles {
                let pid = rp
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|kv| kv.key == "process.pid"))
                    .and_then(|kv| kv.value.as_ref())
                    .and_then(|v| match v.value {
                        Some(opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(i)) => Some(i),
                        _ => None,
                    })
                    .expect("process.pid");
                for prof in rp.scope_profiles.iter().flat_map(|s| &s.profiles) {
                    for s in &prof.samples {
                        let stack = &d.stack_table[s.stack_index as usize];
                        let loc = &d.location_table[stack.location_indices[0] as usize];
                        let f = &d.function_table[loc.lines[0].function_index as usize];
                        let name = d.string_table[f.name_strindex as usize].clone();
                        *out.entry((pid, name)).or_default() += s.values.iter().sum::<i64>();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn a_request_that_fits_is_not_split() {
        let p = many_processes(50, 2, 0);
        let reqs = encode_split(&[&p], &Resource::default(), MAX_REQUEST_BYTES);
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0], super::super::encode(&[&p], &Resource::default()));
    }

    #[test]
    fn parts_fit_the_limit_and_carry_every_process_and_value_once() {
        let p = many_processes(2000, 3, 0);
        let whole = super::super::encode(&[&p], &Resource::default());
        let max = whole.encoded_len() / 5;
        let parts = encode_split(&[&p], &Resource::default(), max);
        assert!(parts.len() >= 5, "{} parts", parts.len());
        for part in &parts {
            assert!(part.encoded_len() <= max, "{} > {max}", part.encoded_len());
            let d = part.dictionary.as_ref().unwrap();
            assert_eq!(d.string_table[0], "", "each part's dictionary stands alone");
        }
        let pids: Vec<usize> = parts.iter().map(|r| r.resource_profiles.len()).collect();
        assert_eq!(pids.iter().sum::<usize>(), 2000, "every process once: {pids:?}");
        assert_eq!(values(&parts), values(&[whole]));
    }

    #[test]
    fn a_single_process_over_the_limit_goes_alone() {
        let p = many_processes(3, 200, 0);
        let parts = encode_split(&[&p], &Resource::default(), 1000);
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|r| r.resource_profiles.len() == 1));
    }
}
