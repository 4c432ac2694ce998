//! Kubernetes' rules for names and keys, checked in Rust as the CRD's patterns state them: a
//! name goes into an API path as is, and in standalone mode a name and a key become a path
//! under `--secrets-dir`, so neither may hold a `/` or be `..`.

/// An RFC 1123 subdomain (`kubectl`'s "DNS subdomain"): most object names, Secrets' and
/// ConfigMaps' among them.
pub const DNS_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// A key of a Secret's or ConfigMap's data: letters, digits, `-`, `_`, `.`; not `.`, not `..`,
/// nor starting with `..`.
pub const DATA_KEY_PATTERN: &str = r"^(\.[-_a-zA-Z0-9]|[-_a-zA-Z0-9])[-._a-zA-Z0-9]*$";

/// An RFC 1123 label: what Kubernetes accepts as a namespace name.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// [`DNS_SUBDOMAIN_PATTERN`], at most 253 characters.
pub fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// [`DATA_KEY_PATTERN`], at most 253 characters.
pub fn is_data_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        && key != "."
        && !key.starts_with("..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_are_dns_labels() {
        for good in ["a", "team-a", "a1", &"x".repeat(63)] {
            assert!(is_dns_label(good), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn names_and_keys_follow_kubernetes_and_the_crd_patterns() {
        let subdomain = regex_lite(DNS_SUBDOMAIN_PATTERN);
        for (name, valid) in [
            ("shop-api", true),
            ("chronflow.io-leader", true),
            ("a", true),
            ("a..b", false),
            (".a", false),
            ("A", false),
            ("../etc", false),
            ("a/b", false),
            ("", false),
            ("-a", false),
        ] {
            assert_eq!(is_dns_subdomain(name), valid, "{name}");
            assert_eq!(subdomain(name), valid, "pattern: {name}");
        }
        let key = regex_lite(DATA_KEY_PATTERN);
        for (text, valid) in [
            ("token", true),
            ("ca.crt", true),
            (".dockerconfigjson", true),
            ("a..", true),
            ("UPPER_case-1", true),
            (".", false),
            ("..", false),
            ("..data", false),
            ("/etc/hostname", false),
            ("a/b", false),
            ("", false),
            ("a b", false),
        ] {
            assert_eq!(is_data_key(text), valid, "{text}");
            assert_eq!(key(text), valid, "pattern: {text}");
        }
    }

    /// The pattern as the apiserver would apply it.
    fn regex_lite(pattern: &str) -> impl Fn(&str) -> bool {
        let regex = regex::Regex::new(pattern).unwrap();
        move |text| regex.is_match(text)
    }
}
