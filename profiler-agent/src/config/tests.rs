use std::{collections::HashMap, path::Path, time::Duration};

use proptest::prelude::*;

use super::{env::parse_pairs, values::parse_bytes, *};

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.toml"))
}

#[test]
fn empty_file_gives_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.sampling.frequency, 19);
    assert_eq!(c.export.interval.0, Duration::from_secs(10));
    assert_eq!(c.http.listen.to_string(), "127.0.0.1:9464");
    assert!(!c.has_exporter());
}

#[test]
fn full_file() {
    let c = parse(
        r#"
[sampling]
frequency = 49
off_cpu = true
off_cpu_min_block = "1ms"
off_cpu_sample = 8

[export]
interval = "30s"

[export.otlp]
endpoint = "http://collector:4318"
protocol = "http/protobuf"
headers = { authorization = "Bearer x" }
buffer_bytes = "8MiB"

[export.pyroscope]
url = "http://pyroscope:4040"

[export.files]
dir = "/tmp/p"
max_age = "2h"
max_bytes = 1000

[http]
listen = "0.0.0.0:9999"

[resource]
service_name = "checkout"
attributes = { "deployment.environment" = "prod" }
"#,
    )
    .unwrap();
    assert_eq!(c.sampling.off_cpu_min_block.0, Duration::from_millis(1));
    assert_eq!(c.sampling.off_cpu_sample, 8);
    let otlp = c.export.otlp.as_ref().unwrap();
    assert_eq!(otlp.protocol, OtlpProtocol::HttpProtobuf);
    assert_eq!(otlp.buffer_bytes.0, 8 << 20);
    assert_eq!(otlp.timeout.0, Duration::from_secs(10), "unset keys keep their defaults");
    assert_eq!(c.export.files.as_ref().unwrap().max_bytes.0, 1000);
    assert_eq!(c.resource.service_name.as_deref(), Some("checkout"));
    assert!(c.has_exporter());
}

#[test]
fn unknown_key_names_the_key_the_line_and_the_expected_keys() {
    let msg = parse("[sampling]\nfrequency = 19\nfrequncy = 20\n").unwrap_err().to_string();
    assert!(msg.contains("frequncy") && msg.contains("line 3") && msg.contains("frequency"), "{msg}");
    assert!(msg.contains("test.toml"), "{msg}");
    let msg = parse("[exporter]\n").unwrap_err().to_string();
    assert!(msg.contains("exporter") && msg.contains("line 1") && msg.contains("export"), "{msg}");
}

#[test]
fn bad_values_say_what_was_expected() {
    let msg = parse("[export]\ninterval = \"soon\"\n").unwrap_err().to_string();
    assert!(msg.contains("soon") && msg.contains("line 2") && msg.contains("10s"), "{msg}");
    let msg = parse("[export.otlp]\nprotocol = \"udp\"\n").unwrap_err().to_string();
    assert!(msg.contains("udp") && msg.contains("grpc"), "{msg}");
    let msg = parse("[sampling]\nfrequency = 0\n").unwrap_err().to_string();
    assert!(msg.contains("sampling.frequency") && msg.contains("1 to 10000"), "{msg}");
    for n in ["0", "1025"] {
        let msg = parse(&format!("[sampling]\noff_cpu_sample = {n}\n")).unwrap_err().to_string();
        assert!(msg.contains("sampling.off_cpu_sample") && msg.contains("1 (exact) to 1024"), "{msg}");
    }
    let msg = parse("[export.pyroscope]\nurl = \"pyroscope:4040\"\n").unwrap_err().to_string();
    assert!(msg.contains("export.pyroscope.url") && msg.contains("http://"), "{msg}");
    let msg = parse("[http]\nlisten = \"localhost\"\n").unwrap_err().to_string();
    assert!(msg.contains("line 2"), "{msg}");
}

#[test]
fn unreadable_file_names_the_path() {
    let msg = Config::load(Path::new("/nonexistent/profiler.toml")).unwrap_err().to_string();
    assert!(msg.contains("/nonexistent/profiler.toml"), "{msg}");
}

#[test]
fn the_shipped_example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config.example.toml");
    let c = Config::load(&path).unwrap();
    assert!(c.has_exporter());
}

#[test]
fn otel_environment_overrides_the_file() {
    let mut c = parse("[export.otlp]\nendpoint = \"http://file:4317\"\n[resource]\nservice_name = \"file\"\n").unwrap();
    let env: HashMap<&str, &str> = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318/"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=a%3Db, x-tenant = t1"),
        ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,team=core"),
        ("OTEL_SERVICE_NAME", "from-env"),
    ]
    .into_iter()
    .collect();
    apply_otel_env(&mut c, |k| env.get(k).map(|v| v.to_string())).unwrap();
    let otlp = c.export.otlp.unwrap();
    assert_eq!(otlp.endpoint, "http://env:4318");
    assert_eq!(otlp.protocol, OtlpProtocol::HttpProtobuf);
    assert_eq!(otlp.headers["api-key"], "a=b");
    assert_eq!(otlp.headers["x-tenant"], "t1");
    assert_eq!(c.resource.attributes["team"], "core");
    assert_eq!(c.resource.service_name.as_deref(), Some("from-env"));
}

#[test]
fn bad_environment_names_the_variable() {
    let mut c = Config::default();
    let e = apply_otel_env(&mut c, |k| (k == "OTEL_EXPORTER_OTLP_PROTOCOL").then(|| "thrift".to_string())).unwrap_err();
    assert_eq!(e.var, "OTEL_EXPORTER_OTLP_PROTOCOL");
    let e = apply_otel_env(&mut c, |k| (k == "OTEL_RESOURCE_ATTRIBUTES").then(|| "novalue".to_string())).unwrap_err();
    assert!(e.to_string().contains("novalue"), "{e}");
    assert!(c.export.otlp.is_none(), "nothing applied from a bad protocol");
}

#[test]
fn tls_keys_and_the_metrics_switch() {
    let c = parse(
        r#"
[export.otlp]
endpoint = "https://collector:4317"
metrics = false
ca_file = "/etc/ca.pem"
client_cert_file = "/etc/tls.crt"
client_key_file = "/etc/tls.key"
"#,
    )
    .unwrap();
    let o = c.export.otlp.unwrap();
    assert!(!o.metrics && !o.insecure);
    assert_eq!(o.ca_file.as_deref(), Some(Path::new("/etc/ca.pem")));
    assert_eq!(o.client_key_file.as_deref(), Some(Path::new("/etc/tls.key")));
    assert!(Otlp::default().metrics, "OTLP metrics are on unless switched off");
    let e = parse("[export.otlp]\nclient_cert_file = \"/etc/tls.crt\"\n").unwrap_err().to_string();
    assert!(e.contains("client_key_file"), "{e}");
}

#[test]
fn otel_tls_variables_and_their_profiles_forms() {
    let env: HashMap<&str, &str> = [
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/generic/ca.pem"),
        ("OTEL_EXPORTER_OTLP_PROFILES_CERTIFICATE", "/profiles/ca.pem"),
        ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/c.pem"),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/k.pem"),
        ("OTEL_EXPORTER_OTLP_INSECURE", "TRUE"),
    ]
    .into();
    let mut c = Config::default();
    apply_otel_env(&mut c, |k| env.get(k).map(|v| v.to_string())).unwrap();
    let o = c.export.otlp.unwrap();
    assert_eq!(o.ca_file.as_deref(), Some(Path::new("/profiles/ca.pem")), "the _PROFILES_ form wins");
    assert_eq!(o.client_cert_file.as_deref(), Some(Path::new("/c.pem")));
    assert_eq!(o.client_key_file.as_deref(), Some(Path::new("/k.pem")));
    assert!(o.insecure);
    let e = apply_otel_env(&mut Config::default(), |k| (k == "OTEL_EXPORTER_OTLP_INSECURE").then(|| "yes".into()))
        .unwrap_err();
    assert_eq!(e.var, "OTEL_EXPORTER_OTLP_INSECURE");
}

#[test]
fn sizes() {
    assert_eq!(parse_bytes("16MiB"), Ok(16 << 20));
    assert_eq!(parse_bytes("1GB"), Ok(1_000_000_000));
    assert_eq!(parse_bytes("512"), Ok(512));
    assert!(parse_bytes("12 parsecs").is_err());
    assert!(parse_bytes("99999999999999GiB").is_err());
}

proptest! {
    #[test]
    fn config_parser_never_panics(s in "\\PC*") {
        let _ = parse(&s);
    }

    #[test]
    fn config_parser_never_panics_on_toml_like_input(
        section in "(sampling|export|export\\.otlp|http|resource|bogus)",
        key in "[a-z_]{1,12}",
        value in "(\"[a-z0-9/:.]{0,10}\"|[0-9]{1,6}|true|\\[\\])",
    ) {
        let _ = parse(&format!("[{section}]\n{key} = {value}\n"));
    }

    #[test]
    fn pairs_parser_never_panics(s in "\\PC*") {
        let _ = parse_pairs(&s);
    }

    #[test]
    fn pairs_round_trip(k in "[a-z.]{1,8}", v in "[a-zA-Z0-9 ]{0,8}") {
        let parsed = parse_pairs(&format!("{k}={v}")).unwrap();
        prop_assert_eq!(parsed.get(&k).map(String::as_str), Some(v.trim()));
    }

    #[test]
    fn sizes_never_panic(s in "\\PC*") {
        let _ = parse_bytes(&s);
    }
}
