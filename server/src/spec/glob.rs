//! The name patterns of parameter groups: '*' matches any run of characters,
//! everything else matches itself. A spec rule of the server (which group a
//! tensor belongs to, which tensors FRUGAL projects), so it lives with the spec.

/// Whether `name` matches a glob `pattern` in which '*' matches any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("*.bias", "fc1.bias"));
        assert!(!glob_match("*.bias", "fc1.weight"));
        assert!(glob_match("layer*.weight", "layer12.weight"));
        assert!(glob_match("a*b*c", "a-x-b-y-c"));
        assert!(!glob_match("a*b*c", "a-x-c"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("ab*ba", "aba"));
    }
}
