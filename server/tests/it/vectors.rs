//! Reading `../shared/vectors/`: where the cases are and how their nested
//! JSON arrays become flat f32 values and shapes.

use std::path::PathBuf;

use serde_json::Value;

/// `$OPT_VECTORS_DIR`, else `shared/vectors` beside the repository.
pub fn dir() -> PathBuf {
    match std::env::var_os("OPT_VECTORS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors"),
    }
}

/// The numbers of a nested array, row-major.
pub fn flat(value: &Value) -> Vec<f32> {
    fn walk(value: &Value, out: &mut Vec<f32>) {
        match value {
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            Value::Number(n) => out.push(n.as_f64().expect("number") as f32),
            other => panic!("unexpected value {other}"),
        }
    }
    let mut out = Vec::new();
    walk(value, &mut out);
    out
}

/// The shape of a nested array.
pub fn shape(value: &Value) -> Vec<usize> {
    match value {
        Value::Array(items) => {
            let mut dims = vec![items.len()];
            dims.extend(items.first().map(shape).unwrap_or_default());
            dims
        }
        _ => Vec::new(),
    }
}
