//! Where webhooks may send requests (`webhooks.allowed_hosts`), so that whoever may create a
//! webhook cannot make relay reach internal services (server-side request forgery).
//!
//! An entry is `public` (any public address: the default when the list is empty), an IP address
//! or CIDR (`10.1.2.0/24`, `127.0.0.1`), or a host name (`hooks.internal`, or `*.internal` for
//! its subdomains). A URL is allowed when its host is a listed name, an IP literal an entry
//! allows, or — with `public` in the list — a name **every** address of which is allowed.
//! Without `public`, a name that is not listed is refused without being resolved: an explicit
//! list names what it allows, and nobody can make relay look up arbitrary names (the lookup
//! itself reaches the resolver). Names are resolved again at every connection
//! ([`GuardedResolver`], the HTTP client's resolver), and the addresses checked then are the
//! ones connected to, so a name that passed at creation and later resolves to `127.0.0.1` (DNS
//! rebinding) is refused at delivery. Redirects are never followed (a public endpoint could
//! otherwise bounce the request inward), and proxies from the environment are not used.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, LazyLock},
    time::Duration,
};

use ipnet::IpNet;

/// The parsed `webhooks.allowed_hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPolicy {
    public: bool,
    nets: Vec<IpNet>,
    /// Lower-case names; a leading `*.` allows every subdomain.
    names: Vec<String>,
}

impl Default for HostPolicy {
    fn default() -> Self {
        Self {
            public: true,
            nets: Vec::new(),
            names: Vec::new(),
        }
    }
}

/// Ranges that are never "public": loopback, private, link-local, shared (CGNAT), multicast,
/// documentation, benchmarking and reserved space, and the IPv6 forms that embed or tunnel
/// IPv4 (checked again on the embedded address where there is one).
static NOT_PUBLIC: LazyLock<Vec<IpNet>> = LazyLock::new(|| {
    [
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "100::/64",
        "2001::/32",
        "2001:db8::/32",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    ]
    .iter()
    .filter_map(|n| n.parse().ok())
    .collect()
});

/// Whether `ip` is a public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !NOT_PUBLIC.iter().any(|n| n.contains(&IpAddr::V4(v4))),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                return is_public(IpAddr::V4(v4));
            }
            !NOT_PUBLIC.iter().any(|n| n.contains(&IpAddr::V6(v6)))
        }
    }
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`),
/// NAT64 (`64:ff9b::/96`) or 6to4 (`2002::/16`) address: what the packet really reaches.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let tail = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(tail()),
        [0, 0, 0, 0, 0, 0, _, _] if v6 != Ipv6Addr::UNSPECIFIED && v6 != Ipv6Addr::LOCALHOST => {
            Some(tail())
        }
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail()),
        [0x2002, a, b, ..] => Some(Ipv4Addr::new(
            (a >> 8) as u8,
            a as u8,
            (b >> 8) as u8,
            b as u8,
        )),
        _ => None,
    }
}

/// An entry of `webhooks.allowed_hosts` that is none of the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not `public`, an IP address or CIDR, or a host name (`*.` allowed in front)")]
pub struct InvalidEntry(pub String);

/// What a URL's host needs before a request may go there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostCheck {
    /// A listed name, or an allowed IP literal: no resolution needed.
    Allowed,
    /// A name to resolve (the policy has `public`); every address must pass
    /// [`HostPolicy::allows_ip`].
    Resolve,
    Refused(String),
}

impl HostPolicy {
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, InvalidEntry> {
        if entries.is_empty() {
            return Ok(Self::default());
        }
        let mut policy = Self {
            public: false,
            nets: Vec::new(),
            names: Vec::new(),
        };
        for entry in entries {
            let entry = entry.as_ref().trim();
            if entry.eq_ignore_ascii_case("public") {
                policy.public = true;
            } else if let Ok(net) = entry.parse::<IpNet>() {
                policy.nets.push(net.trunc());
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                policy.nets.push(IpNet::from(ip));
            } else if valid_name(entry.strip_prefix("*.").unwrap_or(entry)) {
                policy.names.push(entry.to_ascii_lowercase());
            } else {
                return Err(InvalidEntry(entry.chars().take(100).collect()));
            }
        }
        Ok(policy)
    }

    /// Whether a request may connect to `ip`.
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            // What an IPv4-mapped address reaches is its IPv4 address.
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        (self.public && is_public(ip)) || self.nets.iter().any(|n| n.contains(&ip))
    }

    /// Whether `name` (a DNS name, no port) is listed by name.
    pub fn allows_name(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.names
            .iter()
            .any(|entry| match entry.strip_prefix("*.") {
                Some(parent) => {
                    name.len() > parent.len() + 1 && name.ends_with(&format!(".{parent}"))
                }
                None => *entry == name,
            })
    }

    /// What the host of `url` needs (see [`HostCheck`]).
    pub fn check_host(&self, url: &url::Url) -> HostCheck {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.ip_check(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.ip_check(IpAddr::V6(ip)),
            Some(url::Host::Domain(name)) if self.allows_name(name) => HostCheck::Allowed,
            Some(url::Host::Domain(name)) if self.public => {
                // `localhost` never needs DNS to know where it goes.
                if name.eq_ignore_ascii_case("localhost") || name.ends_with(".localhost") {
                    self.ip_check(IpAddr::V4(Ipv4Addr::LOCALHOST))
                } else {
                    HostCheck::Resolve
                }
            }
            Some(url::Host::Domain(name)) => {
                HostCheck::Refused(format!("`{name}` is not in webhooks.allowed_hosts"))
            }
            None => HostCheck::Refused("the URL has no host".to_owned()),
        }
    }

    fn ip_check(&self, ip: IpAddr) -> HostCheck {
        if self.allows_ip(ip) {
            HostCheck::Allowed
        } else {
            HostCheck::Refused(refusal(ip))
        }
    }

    /// Resolve `url`'s host (when it is a name) and check every address; the answer for an API
    /// call that creates a webhook. Delivery checks again at every connection.
    pub async fn check_url(&self, url: &url::Url, timeout: Duration) -> Result<(), String> {
        match self.check_host(url) {
            HostCheck::Allowed => Ok(()),
            HostCheck::Refused(why) => Err(why),
            HostCheck::Resolve => {
                let host = url.host_str().unwrap_or_default();
                let port = url.port_or_known_default().unwrap_or(443);
                let addrs = resolve(host, port, timeout).await?;
                self.check_addresses(host, &addrs).map(|_| ())
            }
        }
    }

    /// The addresses of `host` a request may use: all of them, or an error naming the first
    /// that is not allowed (one bad address refuses the name: which one a connection would use
    /// is not ours to choose).
    pub fn check_addresses(
        &self,
        host: &str,
        addrs: &[SocketAddr],
    ) -> Result<Vec<SocketAddr>, String> {
        if addrs.is_empty() {
            return Err(format!("`{host}` resolves to no address"));
        }
        if let Some(bad) = addrs.iter().find(|a| !self.allows_ip(a.ip())) {
            return Err(format!("`{host}` resolves to {}", refusal(bad.ip())));
        }
        Ok(addrs.to_vec())
    }
}

fn refusal(ip: IpAddr) -> String {
    format!(
        "{ip}, which webhooks.allowed_hosts does not allow (private, loopback and link-local addresses need an explicit entry)"
    )
}

/// A DNS name as it may appear in a URL: labels of letters, digits and hyphens.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

async fn resolve(host: &str, port: u16, timeout: Duration) -> Result<Vec<SocketAddr>, String> {
    match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(addrs)) => Ok(addrs.collect()),
        Ok(Err(err)) => Err(format!("cannot resolve `{host}`: {err}")),
        Err(_) => Err(format!("resolving `{host}` took longer than {timeout:?}")),
    }
}

/// The webhook client's DNS resolver: resolves as the system does, then applies the policy to
/// what it returned, so the client only ever connects to allowed addresses.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    pub policy: Arc<HostPolicy>,
    pub timeout: Duration,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = Arc::clone(&self.policy);
        let timeout = self.timeout;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            // The port is the client's to set; 0 here is replaced by the URL's.
            let addrs = resolve(&host, 0, timeout).await?;
            let allowed = if policy.allows_name(&host) {
                addrs
            } else {
                policy.check_addresses(&host, &addrs)?
            };
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).unwrap()
    }

    #[test]
    fn the_default_allows_public_addresses_only() {
        let p = HostPolicy::default();
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(p.allows_ip(ip(public)), "{public}");
        }
        for private in [
            "127.0.0.1",
            "127.8.9.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "2001:db8::1",
        ] {
            assert!(!p.allows_ip(ip(private)), "{private}");
        }
        assert_eq!(
            p.check_host(&url("https://hooks.example.com/x")),
            HostCheck::Resolve
        );
        assert!(matches!(
            p.check_host(&url("http://127.0.0.1:8080/")),
            HostCheck::Refused(_)
        ));
        assert!(matches!(
            p.check_host(&url("http://[::1]/")),
            HostCheck::Refused(_)
        ));
        assert!(matches!(
            p.check_host(&url("http://localhost/")),
            HostCheck::Refused(_)
        ));
        assert!(matches!(
            p.check_host(&url("http://a.localhost/")),
            HostCheck::Refused(_)
        ));
        assert!(matches!(
            p.check_host(&url("http://2130706433/")),
            HostCheck::Refused(_)
        ));
        assert!(matches!(
            p.check_host(&url("http://0x7f.1/")),
            HostCheck::Refused(_)
        ));
    }

    #[test]
    fn entries_allow_what_they_name() {
        let p =
            HostPolicy::parse(&["127.0.0.1", "10.1.0.0/16", "hooks.internal", "*.svc"]).unwrap();
        assert!(p.allows_ip(ip("127.0.0.1")));
        assert!(!p.allows_ip(ip("127.0.0.2")));
        assert!(p.allows_ip(ip("10.1.200.3")));
        assert!(!p.allows_ip(ip("10.2.0.1")));
        assert!(!p.allows_ip(ip("8.8.8.8")), "public is not listed");
        assert!(
            p.allows_ip(ip("::ffff:127.0.0.1")),
            "the mapped form of a listed address"
        );
        assert_eq!(
            p.check_host(&url("http://hooks.internal/")),
            HostCheck::Allowed
        );
        assert_eq!(
            p.check_host(&url("http://HOOKS.internal./")),
            HostCheck::Allowed
        );
        assert_eq!(p.check_host(&url("http://a.b.svc/")), HostCheck::Allowed);
        assert!(
            matches!(p.check_host(&url("http://svc/")), HostCheck::Refused(_)),
            "not listed, and no `public`: refused without resolving"
        );
        assert_eq!(
            p.check_host(&url("http://127.0.0.1:9/")),
            HostCheck::Allowed
        );
        let names_only = HostPolicy::parse(&["hooks.internal"]).unwrap();
        assert!(matches!(
            names_only.check_host(&url("http://other.example/")),
            HostCheck::Refused(_)
        ));
        let with_public = HostPolicy::parse(&["public", "10.0.0.0/8"]).unwrap();
        assert!(with_public.allows_ip(ip("8.8.8.8")) && with_public.allows_ip(ip("10.9.9.9")));
        assert!(!with_public.allows_ip(ip("192.168.0.1")));
        for bad in ["", "http://x", "a b", "-x.com", "1.2.3.4/40", "x..y"] {
            assert!(HostPolicy::parse(&[bad]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_resolved_address_must_pass() {
        let p = HostPolicy::default();
        let good: SocketAddr = "8.8.8.8:443".parse().unwrap();
        let bad: SocketAddr = "10.0.0.1:443".parse().unwrap();
        assert!(p.check_addresses("x", &[good]).is_ok());
        assert!(p.check_addresses("x", &[good, bad]).is_err());
        assert!(p.check_addresses("x", &[]).is_err());
    }

    proptest! {
        /// An IPv4 address and its IPv4-mapped IPv6 form are judged alike, under any policy.
        #[test]
        fn mapped_addresses_are_judged_as_their_ipv4(a in any::<u32>(), listed in any::<u32>(), prefix in 0u8..=32) {
            let v4 = Ipv4Addr::from(a);
            let mapped = IpAddr::V6(v4.to_ipv6_mapped());
            let net = format!("{}/{prefix}", Ipv4Addr::from(listed));
            for p in [HostPolicy::default(), HostPolicy::parse(&[net]).unwrap()] {
                prop_assert_eq!(p.allows_ip(IpAddr::V4(v4)), p.allows_ip(mapped));
            }
        }

        /// The default never allows a loopback, private or link-local IPv4 address.
        #[test]
        fn private_ranges_are_never_public(host in any::<u32>()) {
            for (base, bits) in [(0x7f00_0000u32, 8), (0x0a00_0000, 8), (0xac10_0000, 12), (0xc0a8_0000, 16), (0xa9fe_0000, 16)] {
                let addr = Ipv4Addr::from(base | (host & (u32::MAX >> bits)));
                prop_assert!(!is_public(IpAddr::V4(addr)), "{}", addr);
            }
        }
    }
}
