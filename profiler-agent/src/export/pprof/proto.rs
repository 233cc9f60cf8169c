//! The messages of google/pprof `proto/profile.proto`
//! (package `perftools.profiles`), written out by hand.
//!
//! Hand-written rather than generated so the build needs neither `protoc`
//! nor a build script; the schema has been stable for years. Field numbers
//! and types must match upstream exactly, since that is the wire format.
//! All `i64` fields documented as "string" are indices into
//! [`Profile::string_table`]; all `*_id` fields refer to the `id` of another
//! message, with 0 meaning "none".

/// The top-level message: one profile.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Profile {
    /// What each entry of [`Sample::value`] measures, in order.
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    /// All strings of the profile; entry 0 must be `""`.
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    /// String: regexp of frames to drop from samples.
    #[prost(int64, tag = "7")]
    pub drop_frames: i64,
    /// String: regexp of frames to keep despite `drop_frames`.
    #[prost(int64, tag = "8")]
    pub keep_frames: i64,
    /// Start of the profile, nanoseconds since the Unix epoch.
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    /// What one sampling event stands for, e.g. `cpu`/`nanoseconds`.
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    /// How much of `period_type` one event stands for.
    #[prost(int64, tag = "12")]
    pub period: i64,
    /// Strings: free-form comments.
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    /// String: the `type` of the sample type viewers should show first.
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
    /// String: URL documenting the profile.
    #[prost(int64, tag = "15")]
    pub doc_url: i64,
}

/// A (type, unit) pair such as `cpu`/`nanoseconds`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueType {
    /// String.
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    /// String.
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

/// One stack with its values and labels.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    /// [`Location::id`]s, leaf first.
    #[prost(uint64, repeated, packed = "true", tag = "1")]
    pub location_id: Vec<u64>,
    /// One value per [`Profile::sample_type`].
    #[prost(int64, repeated, packed = "true", tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

/// A key with either a string or a numeric value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    /// String.
    #[prost(int64, tag = "1")]
    pub key: i64,
    /// String; 0 when the label is numeric.
    #[prost(int64, tag = "2")]
    pub str: i64,
    #[prost(int64, tag = "3")]
    pub num: i64,
    /// String: unit of `num`.
    #[prost(int64, tag = "4")]
    pub num_unit: i64,
}

/// A binary mapped into the process (or the kernel).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Mapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    /// String.
    #[prost(int64, tag = "5")]
    pub filename: i64,
    /// String.
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
    #[prost(bool, tag = "10")]
    pub has_inline_frames: bool,
}

/// One program counter and the (possibly inlined) functions it is in.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(uint64, tag = "3")]
    pub address: u64,
    /// Innermost (most deeply inlined) first; the last line is the function
    /// that really owns the address.
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
    #[prost(bool, tag = "5")]
    pub is_folded: bool,
}

/// A source position inside one function.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
    #[prost(int64, tag = "3")]
    pub column: i64,
}

/// A function, shared by all the lines in it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// String: human-readable (demangled) name.
    #[prost(int64, tag = "2")]
    pub name: i64,
    /// String: name as the linker sees it.
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    /// String: source file.
    #[prost(int64, tag = "4")]
    pub filename: i64,
    #[prost(int64, tag = "5")]
    pub start_line: i64,
}
