//! The standard OpenTelemetry environment variables, applied over the file
//! configuration: OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_PROTOCOL,
//! OTEL_EXPORTER_OTLP_HEADERS, OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME,
//! and the TLS ones: OTEL_EXPORTER_OTLP_CERTIFICATE, _CLIENT_CERTIFICATE,
//! _CLIENT_KEY and _INSECURE, each also as OTEL_EXPORTER_OTLP_PROFILES_*,
//! which wins (the profiles are what this exporter is for).

use std::collections::BTreeMap;

use super::{Config, Otlp};

/// A malformed environment variable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{var}: {message}")]
pub struct EnvError {
    pub var: &'static str,
    pub message: String,
}

/// Applies the OTEL_* variables found by `get` (normally `std::env::var`)
/// to `config`. Setting the endpoint or protocol enables the OTLP exporter.
pub fn apply_otel_env(config: &mut Config, get: impl Fn(&str) -> Option<String>) -> Result<(), EnvError> {
    let non_empty = |k: &str| get(k).filter(|v| !v.trim().is_empty());
    if let Some(endpoint) = non_empty("OTEL_EXPORTER_OTLP_ENDPOINT") {
        config.export.otlp.get_or_insert_with(Otlp::default).endpoint =
            endpoint.trim().trim_end_matches('/').to_owned();
    }
    if let Some(protocol) = non_empty("OTEL_EXPORTER_OTLP_PROTOCOL") {
        let p = protocol.trim().parse().map_err(|message| EnvError { var: "OTEL_EXPORTER_OTLP_PROTOCOL", message })?;
        config.export.otlp.get_or_insert_with(Otlp::default).protocol = p;
    }
    if let Some(headers) = non_empty("OTEL_EXPORTER_OTLP_HEADERS") {
        let parsed =
            parse_pairs(&headers).map_err(|message| EnvError { var: "OTEL_EXPORTER_OTLP_HEADERS", message })?;
        config.export.otlp.get_or_insert_with(Otlp::default).headers.extend(parsed);
    }
    for (key, set) in TLS_VARS {
        let profiles = key.replace("OTEL_EXPORTER_OTLP_", "OTEL_EXPORTER_OTLP_PROFILES_");
        if let Some(value) = non_empty(&profiles).or_else(|| non_empty(key)) {
            set(config.export.otlp.get_or_insert_with(Otlp::default), value.trim())
                .map_err(|message| EnvError { var: key, message })?;
        }
    }
    if let Some(attrs) = non_empty("OTEL_RESOURCE_ATTRIBUTES") {
        let parsed = parse_pairs(&attrs).map_err(|message| EnvError { var: "OTEL_RESOURCE_ATTRIBUTES", message })?;
        config.resource.attributes.extend(parsed);
    }
    if let Some(name) = non_empty("OTEL_SERVICE_NAME") {
        config.resource.service_name = Some(name.trim().to_owned());
    }
    Ok(())
}

type SetTls = fn(&mut Otlp, &str) -> Result<(), String>;

/// The TLS variables and what each sets; the spec's names for certificate
/// files are paths to PEM files.
const TLS_VARS: &[(&str, SetTls)] = &[
    ("OTEL_EXPORTER_OTLP_CERTIFICATE", |o, v| {
        o.ca_file = Some(v.into());
        Ok(())
    }),
    ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", |o, v| {
        o.client_cert_file = Some(v.into());
        Ok(())
    }),
    ("OTEL_EXPORTER_OTLP_CLIENT_KEY", |o, v| {
        o.client_key_file = Some(v.into());
        Ok(())
    }),
    ("OTEL_EXPORTER_OTLP_INSECURE", |o, v| {
        o.insecure = match v.to_ascii_lowercase().as_str() {
            "true" => true,
            "false" => false,
            other => return Err(format!("`{other}` is not `true` or `false`")),
        };
        Ok(())
    }),
];

/// `key1=value1,key2=value2` with percent-encoded keys and values, as the
/// OpenTelemetry specification defines for headers and resource attributes.
pub fn parse_pairs(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = item.split_once('=').ok_or_else(|| format!("`{item}` is not key=value"))?;
        let key = percent_decode(k.trim())?;
        if key.is_empty() {
            return Err(format!("`{item}` has an empty key"));
        }
        out.insert(key, percent_decode(v.trim())?);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in `{s}`"))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` is not UTF-8 once decoded"))
}
