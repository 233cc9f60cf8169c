//! The pprof messages the tests read (a subset of profile.proto's fields,
//! with its tags), and decoding of the agent's gzipped `.pb.gz` files.

use std::io::Read;
use std::path::Path;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(int64, tag = "12")]
    pub period: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    #[prost(int64, tag = "1")]
    pub key: i64,
    #[prost(int64, tag = "2")]
    pub str: i64,
    #[prost(int64, tag = "3")]
    pub num: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
    #[prost(int64, tag = "5")]
    pub start_line: i64,
}

/// Gunzips and decodes a `.pb.gz` file's bytes.
pub fn decode_gz(gz: &[u8]) -> Result<Profile, String> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gz).read_to_end(&mut raw).map_err(|e| format!("does not gunzip: {e}"))?;
    if raw.is_empty() {
        return Err("is empty once decompressed".into());
    }
    <Profile as prost::Message>::decode(&raw[..]).map_err(|e| format!("is not a pprof Profile: {e}"))
}

/// Reads and decodes a `.pb.gz` file, panicking with its path.
pub fn read(path: &Path) -> Profile {
    let gz = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    decode_gz(&gz).unwrap_or_else(|e| panic!("{} {e}", path.display()))
}

/// One frame of a sample resolved through its location and function: the
/// function's name and file (string table entries) and the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub name: String,
    pub filename: String,
    pub line: i64,
}

impl Profile {
    /// String table entry `i`; "" when out of range.
    pub fn string(&self, i: i64) -> &str {
        usize::try_from(i).ok().and_then(|i| self.string_table.get(i)).map_or("", String::as_str)
    }

    /// The frames of `sample`, leaf first as pprof orders locations (a
    /// location's inlined lines innermost first). A location or function id
    /// that resolves to nothing gives a frame named `?location N` or
    /// `?function N`, so checks fail on it rather than skip it.
    pub fn frames(&self, sample: &Sample) -> Vec<Frame> {
        let mut out = Vec::new();
        for id in &sample.location_id {
            let Some(loc) = self.location.iter().find(|l| l.id == *id) else {
                out.push(Frame { name: format!("?location {id}"), filename: String::new(), line: 0 });
                continue;
            };
            for line in &loc.line {
                let frame = match self.function.iter().find(|f| f.id == line.function_id) {
                    Some(f) => Frame {
                        name: self.string(f.name).to_owned(),
                        filename: self.string(f.filename).to_owned(),
                        line: line.line,
                    },
                    None => Frame { name: format!("?function {}", line.function_id), filename: String::new(), line: 0 },
                };
                out.push(frame);
            }
        }
        out
    }
}
