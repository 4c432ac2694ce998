//! Where HTTP actions may connect (`http.deny_cidrs`, `http.allow_cidrs`): every address is
//! matched in each form it reaches, so an IPv6 spelling of a denied IPv4 address is denied too,
//! and a resolver that applies the policy to every name at connect time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// Where actions may connect (`http.deny_cidrs`, `http.allow_cidrs`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// Networks no action may reach (`http.deny_cidrs`).
    pub deny: Vec<ipnet::IpNet>,
    /// Empty: anywhere not denied.
    pub allow: Vec<ipnet::IpNet>,
}

impl AddressPolicy {
    /// `Err` says why `ip` may not be reached, naming the setting. An IPv6 address that carries
    /// an IPv4 one ([`embedded_ipv4`]) is denied when either form is, and allowed when either
    /// is; an unspecified address is always refused (connecting to it reaches this host).
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        let embedded = match ip {
            IpAddr::V6(v6) => embedded_ipv4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let shown = match embedded {
            Some(v4) => format!("{ip} ({v4})"),
            None => ip.to_string(),
        };
        let forms = || std::iter::once(ip).chain(embedded);
        if forms().any(is_unspecified) {
            return Err(format!(
                "the address {shown} is not allowed (an unspecified address reaches this host)"
            ));
        }
        if let Some(net) = self
            .deny
            .iter()
            .find(|net| forms().any(|form| net.contains(&form)))
        {
            return Err(format!(
                "the address {shown} is not allowed (http.deny_cidrs has {net})"
            ));
        }
        if !self.allow.is_empty()
            && !self
                .allow
                .iter()
                .any(|net| forms().any(|form| net.contains(&form)))
        {
            return Err(format!(
                "the address {shown} is not allowed (not in http.allow_cidrs)"
            ));
        }
        Ok(())
    }

    /// The addresses of `resolved` the policy allows; `Err` when it allows none, saying why the
    /// first was refused.
    fn filter(&self, host: &str, resolved: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, String> {
        let mut refused = None;
        let allowed: Vec<SocketAddr> = resolved
            .into_iter()
            .filter(|address| match self.check(address.ip()) {
                Ok(()) => true,
                Err(why) => {
                    refused.get_or_insert(why);
                    false
                }
            })
            .collect();
        match (allowed.is_empty(), refused) {
            (true, Some(why)) => Err(format!("{host}: {why}")),
            _ => Ok(allowed),
        }
    }
}

/// `0.0.0.0/8` ("this network") and `::`: Linux connects them to the local host.
fn is_unspecified(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 0,
        IpAddr::V6(v6) => v6.is_unspecified(),
    }
}

/// The IPv4 address an IPv6 one reaches: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// (`::a.b.c.d`, deprecated, but `::` and `::1` excepted) and the NAT64 well-known prefix
/// (`64:ff9b::/96`, RFC 6052), whose gateway connects to the embedded address.
pub fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let [a, b, c, d, e, f, g, h] = ip.segments();
    let v4 = Ipv4Addr::from(((g as u32) << 16) | h as u32);
    let compatible = [a, b, c, d, e, f] == [0; 6] && u32::from(v4) > 1;
    let nat64 = [a, b, c, d, e, f] == [0x64, 0xff9b, 0, 0, 0, 0];
    (compatible || nat64).then_some(v4)
}

/// Resolves host names, then keeps only the addresses the policy allows: a name that points at
/// a denied address is refused at connect time, whatever it resolved to when the task was made.
pub(super) struct Guarded(pub(super) Arc<AddressPolicy>);

impl reqwest::dns::Resolve for Guarded {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let resolved = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed = policy.filter(&host, resolved)?;
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn policy(deny: &[&str], allow: &[&str]) -> AddressPolicy {
        let nets = |list: &[&str]| list.iter().map(|n| n.parse().unwrap()).collect();
        AddressPolicy {
            deny: nets(deny),
            allow: nets(allow),
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_address_policy_denies_first_then_allows_only_what_is_listed() {
        let open = policy(&["169.254.0.0/16"], &[]);
        assert_eq!(
            open.check(ip("169.254.169.254")),
            Err(
                "the address 169.254.169.254 is not allowed (http.deny_cidrs has 169.254.0.0/16)"
                    .into()
            )
        );
        assert_eq!(open.check(ip("10.1.2.3")), Ok(()));
        let closed = policy(&[], &["10.0.0.0/8"]);
        assert_eq!(closed.check(ip("10.1.2.3")), Ok(()));
        let refused = closed.check(ip("192.168.1.1")).unwrap_err();
        assert!(refused.contains("not in http.allow_cidrs"), "{refused}");
    }

    #[test]
    fn ipv6_spellings_of_a_denied_ipv4_address_are_denied() {
        let loopback = policy(&["127.0.0.1/32"], &[]);
        for spelling in ["::ffff:127.0.0.1", "::127.0.0.1", "64:ff9b::7f00:1"] {
            assert_eq!(
                loopback.check(ip(spelling)),
                Err(format!(
                    "the address {} (127.0.0.1) is not allowed (http.deny_cidrs has 127.0.0.1/32)",
                    ip(spelling)
                )),
                "{spelling}"
            );
        }
        // The same holds for a list of IPv6 networks only, and the other way round.
        assert!(
            policy(&["::ffff:0:0/96"], &[])
                .check(ip("::ffff:10.0.0.1"))
                .is_err()
        );
        let only_ten = policy(&[], &["10.0.0.0/8"]);
        assert_eq!(only_ten.check(ip("::ffff:10.1.2.3")), Ok(()));
        assert!(only_ten.check(ip("::ffff:192.168.1.1")).is_err());
        // Plain IPv6 addresses are themselves: ::1 is not 0.0.0.1, 2001:db8:: carries nothing.
        assert_eq!(loopback.check(ip("::1")), Ok(()));
        assert_eq!(embedded_ipv4("2001:db8::7f00:1".parse().unwrap()), None);
    }

    #[test]
    fn unspecified_addresses_are_always_refused() {
        let anywhere = AddressPolicy::default();
        for unspecified in ["0.0.0.0", "0.1.2.3", "::", "::ffff:0.0.0.0"] {
            let error = anywhere.check(ip(unspecified)).unwrap_err();
            assert!(
                error.ends_with("(an unspecified address reaches this host)"),
                "{error}"
            );
        }
    }

    #[test]
    fn a_resolver_answer_keeps_only_allowed_addresses_in_any_spelling() {
        let loopback = policy(&["127.0.0.0/8"], &[]);
        let answer = |list: &[&str]| -> Vec<SocketAddr> {
            list.iter().map(|a| SocketAddr::new(ip(a), 0)).collect()
        };
        let error = loopback
            .filter("evil.example", answer(&["::ffff:127.0.0.1", "127.0.0.2"]))
            .unwrap_err();
        assert_eq!(
            error,
            "evil.example: the address ::ffff:127.0.0.1 (127.0.0.1) is not allowed \
             (http.deny_cidrs has 127.0.0.0/8)"
        );
        let mixed = answer(&["::ffff:127.0.0.1", "10.0.0.1"]);
        assert_eq!(
            loopback.filter("mixed.example", mixed),
            Ok(answer(&["10.0.0.1"]))
        );
    }
}
