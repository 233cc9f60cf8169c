//! Human-friendly value types for the config file: `"10s"`, `"512MiB"`.

use std::{fmt, time::Duration};

use serde::{de, Deserialize, Deserializer};

use crate::duration::parse_duration;

/// A duration written as `"10s"`, `"500ms"`, `"2m"`, or a number of seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const ZERO: Self = Self(Duration::ZERO);
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"10s\", \"500ms\", \"2m\", or a number of seconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                parse_duration(v).map(HumanDuration).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                u64::try_from(v)
                    .map(|s| HumanDuration(Duration::from_secs(s)))
                    .map_err(|_| E::custom(format!("invalid duration {v}: must not be negative")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<HumanDuration, E> {
                parse_duration(&v.to_string()).map(HumanDuration).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A size written as `"16MiB"`, `"1GB"`, `"512k"`, or a number of bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteSize(pub u64);

pub use crate::options::parse_bytes;

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"16MiB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_bytes(v).map(ByteSize).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }
        }
        d.deserialize_any(V)
    }
}

/// `10s`, `500ms`, `2m`, `24h`: how the configuration reference shows defaults.
#[cfg(test)]
impl serde::Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d = self.0;
        let text = match (d.as_secs(), d.subsec_nanos()) {
            (0, 0) => "0".to_owned(),
            (secs, 0) if secs % 3600 == 0 => format!("{}h", secs / 3600),
            (secs, 0) if secs % 60 == 0 => format!("{}m", secs / 60),
            (secs, 0) => format!("{secs}s"),
            _ => format!("{}ms", d.as_millis()),
        };
        s.serialize_str(&text)
    }
}

#[cfg(test)]
impl schemars::JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "format": "duration" })
    }
}

/// `16MiB`, `1GiB`, or bytes: how the configuration reference shows defaults.
#[cfg(test)]
impl serde::Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let b = self.0;
        let text = match b {
            0 => "0".to_owned(),
            b if b % (1 << 30) == 0 => format!("{}GiB", b >> 30),
            b if b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
            b if b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
            b => b.to_string(),
        };
        s.serialize_str(&text)
    }
}

#[cfg(test)]
impl schemars::JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "size".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "format": "size" })
    }
}
