//! The request-wide `ProfilesDictionary` while it is being built.
//!
//! Every table starts with its zero value at index 0 (the proto uses index 0
//! as "not set"), and every entry is interned through a hash map so each
//! distinct value appears exactly once. Seeding the maps with the zero value
//! also means a value that happens to equal it (an empty stack, a mapping
//! without a file name) resolves to index 0 instead of becoming a duplicate.

use std::collections::HashMap;
use std::hash::Hash;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue};
use opentelemetry_proto::tonic::profiles::v1development::{
    Function, KeyValueAndUnit, Line, Link, Location, Mapping, ProfilesDictionary, Stack,
};

/// An attribute value as the encoder produces them. `Location` and
/// `KeyValueAndUnit` are not `Hash` (the latter can hold a float), so tables
/// holding them are keyed by these plain values instead.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AttrValue {
    Str(String),
    Int(i64),
}

/// Identity of a location: mapping, address, lines and attributes.
type LocationKey = (i32, u64, Vec<Line>, Vec<i32>);

/// One dictionary table: entries in index order plus the reverse lookup.
struct Table<K, V> {
    items: Vec<V>,
    index: HashMap<K, i32>,
}

impl<K: Hash + Eq, V> Table<K, V> {
    fn with_zero(key: K, zero: V) -> Self {
        Self { items: vec![zero], index: HashMap::from([(key, 0)]) }
    }

    /// The index of `key`, adding `make()` at the end if it is new.
    fn intern(&mut self, key: K, make: impl FnOnce() -> V) -> i32 {
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        // Indices are int32 on the wire. Two billion entries would need tens of
        // gigabytes of request, far beyond any receiver's message limit, so
        // reaching this is a bug in the caller's batching, not a data case.
        let i = i32::try_from(self.items.len()).expect("OTLP dictionary table exceeds i32 indices");
        self.items.push(make());
        self.index.insert(key, i);
        i
    }
}

/// Builder for the one `ProfilesDictionary` shared by a whole request.
pub struct Dictionary {
    strings: Table<String, String>,
    functions: Table<Function, Function>,
    mappings: Table<Mapping, Mapping>,
    locations: Table<LocationKey, Location>,
    stacks: Table<Vec<i32>, Stack>,
    attributes: Table<(i32, AttrValue, i32), KeyValueAndUnit>,
}

impl Dictionary {
    pub fn new() -> Self {
        Self {
            strings: Table::with_zero(String::new(), String::new()),
            functions: Table::with_zero(Function::default(), Function::default()),
            mappings: Table::with_zero(Mapping::default(), Mapping::default()),
            locations: Table::with_zero((0, 0, Vec::new(), Vec::new()), Location::default()),
            stacks: Table::with_zero(Vec::new(), Stack::default()),
            // The zero attribute has an empty key and no value at all; no
            // attribute the encoder makes has an empty key, so the key used
            // here can never collide with a real one.
            attributes: Table::with_zero((0, AttrValue::Int(0), 0), KeyValueAndUnit::default()),
        }
    }

    pub fn string(&mut self, s: &str) -> i32 {
        if let Some(&i) = self.strings.index.get(s) {
            return i;
        }
        self.strings.intern(s.to_owned(), || s.to_owned())
    }

    pub fn function(&mut self, name: &str, file: Option<&str>) -> i32 {
        let name = self.string(name);
        let function = Function {
            name_strindex: name,
            // We only keep demangled names; consumers fall back to `name` anyway.
            system_name_strindex: name,
            filename_strindex: self.string(file.unwrap_or("")),
            start_line: 0,
        };
        self.functions.intern(function, || function)
    }

    pub fn mapping(&mut self, path: &str, attribute_indices: Vec<i32>) -> i32 {
        // Addresses are module-relative (file offsets, or kernel addresses),
        // so start = offset = 0 makes `file_offset + address - memory_start`
        // the address itself, as pprof-style symbolizers compute it.
        let mapping = Mapping { filename_strindex: self.string(path), attribute_indices, ..Default::default() };
        self.mappings.intern(mapping.clone(), || mapping)
    }

    pub fn location(&mut self, mapping_index: i32, address: u64, lines: Vec<Line>, attributes: Vec<i32>) -> i32 {
        let key = (mapping_index, address, lines, attributes);
        let location = Location { mapping_index, address, lines: key.2.clone(), attribute_indices: key.3.clone() };
        self.locations.intern(key, || location)
    }

    /// The stack of `location_indices`, leaf first.
    pub fn stack(&mut self, location_indices: Vec<i32>) -> i32 {
        let stack = Stack { location_indices: location_indices.clone() };
        self.stacks.intern(location_indices, || stack)
    }

    pub fn attribute(&mut self, key: &str, value: AttrValue) -> i32 {
        let key_strindex = self.string(key);
        let any = match &value {
            // Plain `string_value` rather than `string_value_strindex`: every
            // receiver generation understands it, the newer field not yet.
            AttrValue::Str(s) => any_value::Value::StringValue(s.clone()),
            AttrValue::Int(i) => any_value::Value::IntValue(*i),
        };
        let kv = KeyValueAndUnit { key_strindex, value: Some(AnyValue { value: Some(any) }), unit_strindex: 0 };
        self.attributes.intern((key_strindex, value, 0), || kv)
    }

    pub fn finish(self) -> ProfilesDictionary {
        ProfilesDictionary {
            mapping_table: self.mappings.items,
            location_table: self.locations.items,
            function_table: self.functions.items,
            // We have no trace context for samples: only the mandatory zero link.
            link_table: vec![Link::default()],
            string_table: self.strings.items,
            attribute_table: self.attributes.items,
            stack_table: self.stacks.items,
        }
    }
}
