//! Outbound URL guard against server-side request forgery (SSRF).
//!
//! Callback URLs are chosen by API clients, so the server must never be steered into calling
//! its own loopback interface, the private network or a cloud metadata endpoint. The guard
//! works in two stages.
//!
//! * **At accept time** [`Guard::check_url`] runs static checks without any DNS: the raw string
//!   must not contain backslashes, control characters or whitespace (characters that URL
//!   parsers disagree about), it must parse, use `https` and carry no userinfo. A literal IP
//!   host, in any notation the URL parser accepts (`2130706433`, `0x7f.1`, `[::ffff:7f00:1]`,
//!   ...), is judged by [`Guard::permits`], and `localhost` / `*.localhost` is refused. The
//!   normalised [`CallbackUrl`] is what gets stored and requested later, so no second parser
//!   ever interprets the raw string.
//! * **At each delivery attempt** [`Guard::resolve`] resolves the host exactly once and keeps
//!   only the permitted addresses. The HTTP client must connect to those addresses and nothing
//!   else (pinning the name to them while keeping it for TLS and the `Host` header) and must
//!   not follow redirects. A DNS rebinding attack needs a record that answers with a public
//!   address when checked and with a private one when connecting; because the connection goes
//!   to the very addresses that were checked, there is no second lookup to exploit.
//!
//! An address is permitted when it is in one of the operator's allow-listed ranges or
//! [`is_public`], which consults the IANA special-purpose registries. IPv6 forms that embed an
//! IPv4 address (mapped, compatible, NAT64, 6to4, Teredo) are unwrapped, so `::ffff:127.0.0.1`
//! is judged like `127.0.0.1`.
//!
//! The allow-list ([`AllowEntry`]) may also name exact hosts (`hooks.internal.example`,
//! case-insensitive, no wildcards). Such a name is trusted whole: it passes the `localhost`
//! check, and every address it resolves to may be contacted, public or not. Every other name
//! is still judged address by address.
//!
//! Lookups go through the system resolver unless [`Guard::with_lookup`] supplies another, so
//! tests can script answers that change from one lookup to the next.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use url::{Host, Url};

// Source: IANA IPv4 Special-Purpose Address Registry, plus multicast and reserved space.
#[rustfmt::skip]
const V4_SPECIAL: &[(Ipv4Net, &str)] = &[
    (v4(0, 0, 0, 0, 8), "\"this\" network"),
    (v4(10, 0, 0, 0, 8), "private-use"),
    (v4(100, 64, 0, 0, 10), "shared address space (CGNAT)"),
    (v4(127, 0, 0, 0, 8), "loopback"),
    (v4(169, 254, 0, 0, 16), "link-local"),
    (v4(172, 16, 0, 0, 12), "private-use"),
    (v4(192, 0, 0, 0, 24), "IETF protocol assignments"),
    (v4(192, 0, 2, 0, 24), "documentation (TEST-NET-1)"),
    (v4(192, 31, 196, 0, 24), "AS112-v4"),
    (v4(192, 52, 193, 0, 24), "AMT"),
    (v4(192, 88, 99, 0, 24), "deprecated 6to4 relay anycast"),
    (v4(192, 168, 0, 0, 16), "private-use"),
    (v4(192, 175, 48, 0, 24), "direct delegation AS112 service"),
    (v4(198, 18, 0, 0, 15), "benchmarking"),
    (v4(198, 51, 100, 0, 24), "documentation (TEST-NET-2)"),
    (v4(203, 0, 113, 0, 24), "documentation (TEST-NET-3)"),
    (v4(224, 0, 0, 0, 4), "multicast"),
    (v4(240, 0, 0, 0, 4), "reserved"),
    (v4(255, 255, 255, 255, 32), "limited broadcast"),
];

// Source: IANA IPv6 Special-Purpose Address Registry (ranges that are never contacted).
#[rustfmt::skip]
const V6_SPECIAL: &[(Ipv6Net, &str)] = &[
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified"),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback"),
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), "IPv4-IPv6 translation, local use"),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), "discard-only"),
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23), "IETF protocol assignments"),
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32), "Teredo"),
    (v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), "documentation"),
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), "documentation"),
    (v6([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16), "segment routing (SRv6) SIDs"),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "unique local"),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local unicast"),
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), "site-local (deprecated)"),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
];

/// Where an IPv4 address sits inside an IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Embedding {
    /// The last 32 bits.
    Low32,
    /// Bits 16..48 (6to4).
    SixToFour,
    /// The bitwise NOT of the last 32 bits (Teredo client).
    Teredo,
}

// Source: IANA IPv6 Special-Purpose Address Registry and RFC 4291 (IPv4-embedding prefixes).
#[rustfmt::skip]
const V6_EMBEDDING: &[(Ipv6Net, &str, Embedding)] = &[
    (v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96), "IPv4-mapped", Embedding::Low32),
    (v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96), "IPv4-IPv6 translation", Embedding::Low32),
    (v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16), "6to4", Embedding::SixToFour),
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32), "Teredo", Embedding::Teredo),
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 96), "IPv4-compatible (deprecated)", Embedding::Low32),
];

/// Global unicast space (RFC 4291); everything outside it is special or unassigned.
const V6_GLOBAL_UNICAST: Ipv6Net = v6([0x2000, 0, 0, 0, 0, 0, 0, 0], 3);

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)
}

const fn v6(s: [u16; 8], len: u8) -> Ipv6Net {
    let addr = Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]);
    Ipv6Net::new_assert(addr, len)
}

/// True if the address is globally routable public unicast (not in any IANA special-purpose
/// range). IPv6 addresses embedding an IPv4 address are judged by the embedded address, except
/// Teredo, which is never public.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => is_public_v6(ip),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    !V4_SPECIAL.iter().any(|(net, _)| net.contains(&ip))
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if V6_SPECIAL.iter().any(|(net, _)| net.contains(&ip)) {
        return false;
    }
    match embedded_v4(ip) {
        Some(inner) => is_public_v4(inner),
        None => V6_GLOBAL_UNICAST.contains(&ip),
    }
}

/// The IPv4 address carried by an IPv4-embedding IPv6 address. `::` and `::1` embed nothing.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = ip.to_bits();
    if bits <= 1 {
        return None;
    }
    let (_, _, embedding) = V6_EMBEDDING.iter().find(|(net, _, _)| net.contains(&ip))?;
    let inner = match embedding {
        Embedding::Low32 => bits as u32,
        Embedding::SixToFour => (bits >> 80) as u32,
        Embedding::Teredo => !(bits as u32),
    };
    Some(Ipv4Addr::from(inner))
}

/// The embedded IPv4 address of `ip`, if any, as an [`IpAddr`].
fn unwrapped(ip: IpAddr) -> Option<IpAddr> {
    match ip {
        IpAddr::V4(_) => None,
        IpAddr::V6(ip) => embedded_v4(ip).map(IpAddr::V4),
    }
}

/// `localhost` and names under `.localhost` (RFC 6761), case-insensitive, trailing dots ignored.
fn is_localhost(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

fn has_forbidden_characters(raw: &str) -> bool {
    raw.chars()
        .any(|c| c == '\\' || c.is_control() || c.is_whitespace())
}

/// A callback URL that passed the static checks (scheme, userinfo, characters, literal host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackUrl(Url);

impl CallbackUrl {
    /// The normalised URL string.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn url(&self) -> &Url {
        &self.0
    }

    /// The host as a string; an IPv6 address comes without brackets.
    pub fn host(&self) -> &str {
        let host = self.0.host_str().unwrap_or_default();
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }

    /// The explicit port, or 443.
    pub fn port(&self) -> u16 {
        self.0.port_or_known_default().unwrap_or(443)
    }
}

impl fmt::Display for CallbackUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a callback URL or address was refused. The messages are meant for API clients.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum GuardError {
    #[error("is not a valid URL: {0}")]
    Invalid(String),
    #[error("must use https")]
    NotHttps,
    #[error("must not contain a username or password")]
    Userinfo,
    #[error("must not contain backslashes, control characters or whitespace")]
    ForbiddenCharacters,
    #[error("points to a non-public address ({0})")]
    ForbiddenAddress(IpAddr),
    #[error("host is not allowed ({0})")]
    ForbiddenHost(String),
    #[error("host has no usable address ({0})")]
    NoAddress(String),
    #[error("host could not be resolved: {0}")]
    Resolve(String),
}

impl GuardError {
    /// A stable `snake_case` name for the error.
    pub fn kind(&self) -> &'static str {
        match self {
            GuardError::Invalid(_) => "invalid",
            GuardError::NotHttps => "not_https",
            GuardError::Userinfo => "userinfo",
            GuardError::ForbiddenCharacters => "forbidden_characters",
            GuardError::ForbiddenAddress(_) => "forbidden_address",
            GuardError::ForbiddenHost(_) => "forbidden_host",
            GuardError::NoAddress(_) => "no_address",
            GuardError::Resolve(_) => "resolve",
        }
    }
}

/// One entry of the operator's allow-list (`--callback-allow`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowEntry {
    /// An address range; a single IP is a `/32` or `/128`.
    Net(IpNet),
    /// An exact host name as the URL parser writes it (lower case, IDNA), without a trailing
    /// dot. Every address it resolves to may be contacted.
    Host(String),
}

impl FromStr for AllowEntry {
    type Err = String;

    /// Reads a CIDR range, a single IP address or an exact host name.
    fn from_str(raw: &str) -> Result<AllowEntry, String> {
        let raw = raw.trim();
        if let Ok(net) = raw.parse::<IpNet>() {
            return Ok(AllowEntry::Net(net.trunc()));
        }
        if let Ok(ip) = raw.parse::<IpAddr>() {
            return Ok(AllowEntry::Net(ip.into()));
        }
        host_name(raw).map(AllowEntry::Host).ok_or_else(|| {
            format!("{raw:?} is neither a CIDR range, an IP address nor a host name")
        })
    }
}

/// The host name a URL with host `raw` carries, if `raw` is a plain DNS name: letters, digits
/// and inner hyphens in labels of 1 to 63 characters, 253 at most in all. Names the URL parser
/// reads as an IPv4 address (`1.2.3`, `0x7f.1`) are not names.
fn host_name(raw: &str) -> Option<String> {
    let raw = raw.strip_suffix('.').unwrap_or(raw);
    let Ok(Host::Domain(name)) = Host::parse(raw) else {
        return None;
    };
    let ldh = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    (name.len() <= 253 && name.split('.').all(ldh)).then_some(name)
}

/// Looks a host name up, returning its socket addresses for `port`.
pub type LookupFn =
    dyn Fn(&str, u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> + Send + Sync;

/// The guard's resolver: the system's unless one was supplied.
#[derive(Clone, Default)]
struct Lookup(Option<Arc<LookupFn>>);

impl Lookup {
    async fn run(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, GuardError> {
        let found = match &self.0 {
            Some(lookup) => lookup(host, port).await,
            None => tokio::net::lookup_host((host, port))
                .await
                .map(Iterator::collect),
        };
        found.map_err(|e| GuardError::Resolve(format!("{host}: {e}")))
    }
}

impl fmt::Debug for Lookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "custom" } else { "system" })
    }
}

/// Judges callback URLs and addresses; ranges and host names in the allow-list may be
/// contacted even when they are not public.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    /// Allow-listed address ranges.
    nets: Vec<IpNet>,
    /// Allow-listed host names, normalised as in [`AllowEntry::Host`].
    hosts: Vec<String>,
    lookup: Lookup,
}

impl Guard {
    pub fn new(allow: Vec<AllowEntry>) -> Guard {
        let mut guard = Guard::default();
        for entry in allow {
            match entry {
                AllowEntry::Net(net) => guard.nets.push(net),
                AllowEntry::Host(name) => guard.hosts.push(name),
            }
        }
        guard
    }

    /// Looks host names up with `lookup` instead of the system resolver. Each delivery attempt
    /// still calls it once and connects only to the addresses it returned that were permitted.
    pub fn with_lookup<F>(mut self, lookup: F) -> Guard
    where
        F: Fn(&str, u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> + Send + Sync,
        F: 'static,
    {
        self.lookup = Lookup(Some(Arc::new(lookup)));
        self
    }

    /// Static checks at accept time; no DNS.
    ///
    /// Literal IP hosts are judged in every notation the URL parser accepts (decimal, hex,
    /// octal, short forms, bracketed IPv6 and IPv4-embedding IPv6). `localhost` and names
    /// under `.localhost` count as loopback and are refused unless `127.0.0.1` or `::1` is
    /// allow-listed, or the name itself is.
    ///
    /// # Errors
    ///
    /// [`GuardError::ForbiddenCharacters`], [`GuardError::Invalid`], [`GuardError::NotHttps`],
    /// [`GuardError::Userinfo`], [`GuardError::ForbiddenAddress`] for a refused literal IP, or
    /// [`GuardError::ForbiddenHost`] for a `localhost` name.
    pub fn check_url(&self, raw: &str) -> Result<CallbackUrl, GuardError> {
        if has_forbidden_characters(raw) {
            return Err(GuardError::ForbiddenCharacters);
        }
        let url = Url::parse(raw).map_err(|e| GuardError::Invalid(e.to_string()))?;
        if url.scheme() != "https" {
            return Err(GuardError::NotHttps);
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(GuardError::Userinfo);
        }
        if url.port() == Some(0) {
            return Err(GuardError::Invalid("port 0 is not allowed".into()));
        }
        self.check_host(&url)?;
        Ok(CallbackUrl(url))
    }

    /// True if the address may be contacted: allow-listed, or public. An IPv6 address that
    /// embeds an IPv4 address matches the allow-list through either of the two.
    pub fn permits(&self, ip: IpAddr) -> bool {
        self.allow_listed(ip) || is_public(ip)
    }

    /// Resolves the host once and returns only the permitted socket addresses, in resolver
    /// order; an allow-listed host name keeps all of its addresses. A literal IP is not looked
    /// up. The static host checks are repeated first, so a URL accepted under a wider
    /// allow-list is judged by this guard.
    ///
    /// # Errors
    ///
    /// [`GuardError::ForbiddenAddress`] with the first refused address if every address is
    /// refused, [`GuardError::NoAddress`] if the lookup returned nothing,
    /// [`GuardError::Resolve`] if it failed, and the static host errors of [`Guard::check_url`].
    pub async fn resolve(&self, url: &CallbackUrl) -> Result<Vec<SocketAddr>, GuardError> {
        self.check_host(url.url())?;
        let port = url.port();
        let candidates = match literal_ip(url.url()) {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None => self.lookup.run(url.host(), port).await?,
        };
        self.select(url.host(), candidates)
    }

    /// Resolves a bare host name once, as a connector does, and returns only the permitted
    /// addresses. A literal IP is checked without a lookup.
    ///
    /// # Errors
    ///
    /// As [`Guard::resolve`].
    pub async fn resolve_host(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, GuardError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            self.check_ip(ip)?;
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        self.check_domain(host)?;
        let candidates = self.lookup.run(host, port).await?;
        self.select(host, candidates)
    }

    /// The allow-list is matched against the address and the IPv4 address it embeds.
    fn allow_listed(&self, ip: IpAddr) -> bool {
        let inner = unwrapped(ip);
        self.nets
            .iter()
            .any(|net| net.contains(&ip) || inner.is_some_and(|inner| net.contains(&inner)))
    }

    /// Exact match, case-insensitive, trailing dot ignored.
    fn host_listed(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        self.hosts
            .iter()
            .any(|host| host.eq_ignore_ascii_case(name))
    }

    fn loopback_allowed(&self) -> bool {
        self.allow_listed(Ipv4Addr::LOCALHOST.into())
            || self.allow_listed(Ipv6Addr::LOCALHOST.into())
    }

    fn check_host(&self, url: &Url) -> Result<(), GuardError> {
        match url.host() {
            None => Err(GuardError::Invalid("missing host".into())),
            Some(Host::Ipv4(ip)) => self.check_ip(ip.into()),
            Some(Host::Ipv6(ip)) => self.check_ip(ip.into()),
            Some(Host::Domain(name)) => self.check_domain(name),
        }
    }

    fn check_ip(&self, ip: IpAddr) -> Result<(), GuardError> {
        if self.permits(ip) {
            Ok(())
        } else {
            Err(GuardError::ForbiddenAddress(ip))
        }
    }

    fn check_domain(&self, name: &str) -> Result<(), GuardError> {
        if name.trim_end_matches('.').is_empty() {
            return Err(GuardError::Invalid("empty host".into()));
        }
        if is_localhost(name) && !self.loopback_allowed() && !self.host_listed(name) {
            return Err(GuardError::ForbiddenHost(name.to_string()));
        }
        Ok(())
    }

    /// Keeps the permitted addresses (first occurrence of each, in resolver order); every
    /// address of an allow-listed host name is permitted.
    fn select(&self, host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, GuardError> {
        let listed = self.host_listed(host);
        let mut permitted: Vec<SocketAddr> = Vec::new();
        let mut refused = None;
        for addr in addrs {
            if !listed && !self.permits(addr.ip()) {
                refused.get_or_insert(addr.ip());
            } else if !permitted.contains(&addr) {
                permitted.push(addr);
            }
        }
        match refused {
            _ if !permitted.is_empty() => Ok(permitted),
            Some(ip) => Err(GuardError::ForbiddenAddress(ip)),
            None => Err(GuardError::NoAddress(host.to_string())),
        }
    }
}

fn literal_ip(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        Host::Ipv4(ip) => Some(ip.into()),
        Host::Ipv6(ip) => Some(ip.into()),
        Host::Domain(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "ok";

    /// (URL, expected outcome) with an empty allow-list.
    const CASES: &[(&str, &str)] = &[
        // Scheme and parsing.
        ("http://example.com/", "not_https"),
        ("HTTP://example.com/", "not_https"),
        ("ftp://example.com/", "not_https"),
        ("ws://example.com/", "not_https"),
        ("file:///etc/passwd", "not_https"),
        ("javascript:alert(1)", "not_https"),
        ("example.com/hook", "invalid"),
        ("", "invalid"),
        ("https://", "invalid"),
        ("https://:443/", "invalid"),
        ("https://[::1/", "invalid"),
        ("https://256.0.0.1/", "invalid"),
        ("https://example.com:0/", "invalid"),
        ("https://example.com:99999/", "invalid"),
        // Userinfo.
        ("https://u:p@example.com/", "userinfo"),
        ("https://u@example.com/", "userinfo"),
        ("https://:p@example.com/", "userinfo"),
        ("https://example.com@127.0.0.1/", "userinfo"),
        // Characters.
        ("https://example.com\\@127.0.0.1/", "forbidden_characters"),
        ("https:\\\\127.0.0.1\\", "forbidden_characters"),
        ("https://exa mple.com/", "forbidden_characters"),
        ("https://example.com/ hook", "forbidden_characters"),
        (" https://example.com/", "forbidden_characters"),
        ("https://example.com/\t", "forbidden_characters"),
        ("https://exam\tple.com/", "forbidden_characters"),
        ("https://example.com/\nx", "forbidden_characters"),
        ("https://example.com\r\n/", "forbidden_characters"),
        ("https://example.com/\u{0}", "forbidden_characters"),
        ("https://example.com/\u{7f}", "forbidden_characters"),
        ("https://example.com/\u{a0}", "forbidden_characters"),
        ("https://example.com/\u{2028}", "forbidden_characters"),
        // Loopback and unspecified in every notation.
        ("https://127.0.0.1/", "forbidden_address"),
        ("https://127.0.0.1:8443/x", "forbidden_address"),
        ("https://127.255.255.254/", "forbidden_address"),
        ("https://[::ffff:127.0.0.1]/", "forbidden_address"),
        ("https://[::ffff:7f00:1]/", "forbidden_address"),
        ("https://2130706433/", "forbidden_address"),
        ("https://0x7f000001/", "forbidden_address"),
        ("https://0x7f.1/", "forbidden_address"),
        ("https://0177.0.0.1/", "forbidden_address"),
        ("https://0177.1/", "forbidden_address"),
        ("https://127.1/", "forbidden_address"),
        ("https://127.0.1/", "forbidden_address"),
        ("https://127.0.0.%31/", "forbidden_address"),
        ("https://[::]/", "forbidden_address"),
        ("https://0.0.0.0/", "forbidden_address"),
        ("https://0/", "forbidden_address"),
        ("https://[::1]/", "forbidden_address"),
        ("https://[0:0:0:0:0:0:0:1]/", "forbidden_address"),
        ("https://localhost/", "forbidden_host"),
        ("https://LOCALHOST./", "forbidden_host"),
        ("https://a.localhost/", "forbidden_host"),
        ("https://a.b.LocalHost./", "forbidden_host"),
        ("https://localhost:8080/x", "forbidden_host"),
        (
            "https://\u{ff4c}\u{ff4f}\u{ff43}\u{ff41}\u{ff4c}host/",
            "forbidden_host",
        ),
        // Private, shared and link-local.
        ("https://10.0.0.1/", "forbidden_address"),
        ("https://10.255.255.255/", "forbidden_address"),
        ("https://012.0.0.1/", "forbidden_address"),
        ("https://167772161/", "forbidden_address"),
        ("https://172.16.0.1/", "forbidden_address"),
        ("https://172.31.255.255/", "forbidden_address"),
        ("https://192.168.1.1/", "forbidden_address"),
        ("https://0xc0.0xa8.1.1/", "forbidden_address"),
        (
            "https://169.254.169.254/latest/meta-data/",
            "forbidden_address",
        ),
        ("https://[::ffff:169.254.169.254]/", "forbidden_address"),
        ("https://100.64.0.1/", "forbidden_address"),
        ("https://100.127.255.255/", "forbidden_address"),
        ("https://[fe80::1]/", "forbidden_address"),
        ("https://[fd00::1]/", "forbidden_address"),
        ("https://[fc00::1]/", "forbidden_address"),
        ("https://[fec0::1]/", "forbidden_address"),
        // IPv4-embedding IPv6 forms and other IPv6 special ranges.
        ("https://[64:ff9b::7f00:1]/", "forbidden_address"),
        ("https://[64:ff9b::10.0.0.1]/", "forbidden_address"),
        ("https://[64:ff9b:1::808:808]/", "forbidden_address"),
        ("https://[2002:7f00:1::]/", "forbidden_address"),
        ("https://[2002:a00:1::1]/", "forbidden_address"),
        ("https://[::127.0.0.1]/", "forbidden_address"),
        ("https://[::10.0.0.1]/", "forbidden_address"),
        (
            "https://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",
            "forbidden_address",
        ),
        (
            "https://[2001:0:4136:e378:8000:63bf:f7f7:f7f7]/",
            "forbidden_address",
        ),
        ("https://[2001:db8::1]/", "forbidden_address"),
        ("https://[100::1]/", "forbidden_address"),
        ("https://[3fff::1]/", "forbidden_address"),
        ("https://[5f00::1]/", "forbidden_address"),
        ("https://[4000::1]/", "forbidden_address"),
        // Multicast, broadcast, reserved, documentation and other special ranges.
        ("https://224.0.0.1/", "forbidden_address"),
        ("https://239.255.255.250/", "forbidden_address"),
        ("https://[ff02::1]/", "forbidden_address"),
        ("https://255.255.255.255/", "forbidden_address"),
        ("https://4294967295/", "forbidden_address"),
        ("https://240.0.0.1/", "forbidden_address"),
        ("https://192.0.2.1/", "forbidden_address"),
        ("https://198.51.100.7/", "forbidden_address"),
        ("https://203.0.113.9/", "forbidden_address"),
        ("https://198.18.0.1/", "forbidden_address"),
        ("https://198.19.255.255/", "forbidden_address"),
        ("https://192.0.0.8/", "forbidden_address"),
        ("https://192.88.99.1/", "forbidden_address"),
        ("https://192.31.196.1/", "forbidden_address"),
        ("https://192.52.193.1/", "forbidden_address"),
        ("https://192.175.48.1/", "forbidden_address"),
        // Public.
        ("https://example.com/hook", OK),
        ("https://93.184.215.14/", OK),
        ("https://[2606:4700::1111]/", OK),
        ("https://8.8.8.8:8443/x?y=1", OK),
        ("https://1.1.1.1/", OK),
        ("https://172.32.0.1/", OK),
        ("https://100.128.0.1/", OK),
        ("https://198.20.0.1/", OK),
        ("https://[::ffff:8.8.8.8]/", OK),
        ("https://[64:ff9b::808:808]/", OK),
        ("https://[2002:808:808::1]/", OK),
        ("https://EXAMPLE.com./hook#frag", OK),
        ("https://b\u{fc}cher.example/", OK),
        ("https://localhost.example.com/", OK),
        ("https://notlocalhost/", OK),
    ];

    fn outcome(result: Result<CallbackUrl, GuardError>) -> &'static str {
        match result {
            Ok(_) => OK,
            Err(e) => e.kind(),
        }
    }

    fn guard(allow: &[&str]) -> Guard {
        Guard::new(allow.iter().map(|n| n.parse().unwrap()).collect())
    }

    fn check_cases(guard: &Guard, cases: &[(&str, &str)]) {
        let failures: Vec<String> = cases
            .iter()
            .filter_map(|&(raw, want)| {
                let got = outcome(guard.check_url(raw));
                (got != want).then(|| format!("{raw:?}: want {want}, got {got}"))
            })
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn url_table() {
        assert!(CASES.len() >= 80, "only {} URL forms", CASES.len());
        check_cases(&Guard::default(), CASES);
    }

    #[test]
    fn allow_list_v4_loopback() {
        let cases = [
            ("https://127.0.0.1:9000/", OK),
            ("https://localhost:9000/", OK),
            ("https://a.localhost:9000/", OK),
            ("https://[::ffff:127.0.0.1]:9000/", OK),
            ("https://2130706433:9000/", OK),
            ("https://10.0.0.1/", "forbidden_address"),
            ("https://[::1]/", "forbidden_address"),
            ("https://example.com/", OK),
            ("http://127.0.0.1/", "not_https"),
        ];
        check_cases(&guard(&["127.0.0.0/8"]), &cases);
    }

    #[test]
    fn allow_list_v6_loopback() {
        let cases = [
            ("https://[::1]:9000/", OK),
            ("https://localhost:9000/", OK),
            ("https://127.0.0.1/", "forbidden_address"),
        ];
        check_cases(&guard(&["::1/128"]), &cases);
    }

    #[test]
    fn allow_list_matches_unwrapped_address() {
        let g = guard(&["10.1.0.0/16"]);
        assert!(g.permits("::ffff:10.1.2.3".parse().unwrap()));
        assert!(g.permits("64:ff9b::10.1.2.3".parse().unwrap()));
        assert!(!g.permits("::ffff:10.2.0.1".parse().unwrap()));
        let g = guard(&["fd00::/8"]);
        assert!(g.permits("fd00::1".parse().unwrap()));
        assert!(!g.permits("fc00::1".parse().unwrap()));
    }

    #[test]
    fn allow_listed_host_names_pass_the_localhost_check_by_exact_name() {
        let cases = [
            ("https://localhost/", OK),
            ("https://LOCALHOST.:9000/x", OK),
            ("https://a.localhost/", "forbidden_host"),
            ("https://127.0.0.1/", "forbidden_address"),
            ("https://[::1]/", "forbidden_address"),
            ("https://example.com/", OK),
        ];
        check_cases(&guard(&["localhost"]), &cases);
        let cases = [
            ("https://hooks.internal.example/", OK),
            ("https://HOOKS.Internal.Example./", OK),
            ("https://localhost/", "forbidden_host"),
            ("https://10.0.0.1/", "forbidden_address"),
        ];
        check_cases(&guard(&["hooks.internal.example"]), &cases);
    }

    #[test]
    fn allow_list_entries_split_into_ranges_and_names() {
        let g = guard(&["10.0.0.0/8", "Hooks.Example.", "::1"]);
        let nets: Vec<IpNet> = ["10.0.0.0/8", "::1/128"].map(|n| n.parse().unwrap()).into();
        assert_eq!(g.nets, nets);
        assert_eq!(g.hosts, ["hooks.example"]);
        assert!(g.host_listed("HOOKS.example."));
        assert!(!g.host_listed("a.hooks.example"));
        assert!(!g.host_listed("hooks.example.com"));
        assert!(!g.permits("192.168.0.1".parse().unwrap()));
    }

    #[test]
    fn embedded_v4_forms() {
        let cases = [
            ("::ffff:10.1.2.3", Some("10.1.2.3")),
            ("64:ff9b::a01:203", Some("10.1.2.3")),
            ("::10.1.2.3", Some("10.1.2.3")),
            ("2002:a01:203:4::5", Some("10.1.2.3")),
            ("2001:0:4136:e378:8000:63bf:f5fe:fdfc", Some("10.1.2.3")),
            ("::", None),
            ("::1", None),
            ("64:ff9b:1::a01:203", None),
            ("2606:4700::1111", None),
        ];
        for (ip, want) in cases {
            let want = want.map(|w| w.parse::<Ipv4Addr>().unwrap());
            assert_eq!(embedded_v4(ip.parse().unwrap()), want, "{ip}");
        }
    }

    #[test]
    fn callback_url_accessors() {
        let g = Guard::default();
        let url = g.check_url("https://[2606:4700::1111]:8443/a?b=1").unwrap();
        assert_eq!(url.host(), "2606:4700::1111");
        assert_eq!(url.port(), 8443);
        assert_eq!(url.as_str(), "https://[2606:4700::1111]:8443/a?b=1");
        let url = g.check_url("https://Example.COM/hook").unwrap();
        assert_eq!(url.host(), "example.com");
        assert_eq!(url.port(), 443);
        assert_eq!(url.to_string(), "https://example.com/hook");
        assert_eq!(url.url().path(), "/hook");
    }

    #[test]
    fn error_kinds_and_messages() {
        let ip: IpAddr = Ipv4Addr::LOCALHOST.into();
        let errors = [
            (GuardError::Invalid("x".into()), "invalid"),
            (GuardError::NotHttps, "not_https"),
            (GuardError::Userinfo, "userinfo"),
            (GuardError::ForbiddenCharacters, "forbidden_characters"),
            (GuardError::ForbiddenAddress(ip), "forbidden_address"),
            (
                GuardError::ForbiddenHost("localhost".into()),
                "forbidden_host",
            ),
            (GuardError::NoAddress("h".into()), "no_address"),
            (GuardError::Resolve("boom".into()), "resolve"),
        ];
        for (error, kind) in errors {
            assert_eq!(error.kind(), kind);
            assert!(!error.to_string().is_empty(), "{error:?}");
        }
        assert_eq!(GuardError::NotHttps.to_string(), "must use https");
    }

    fn sock(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn select_filters_and_reports() {
        let g = Guard::default();
        let mixed = vec![
            sock("10.0.0.1:443"),
            sock("8.8.8.8:443"),
            sock("8.8.8.8:443"),
        ];
        assert_eq!(g.select("h", mixed), Ok(vec![sock("8.8.8.8:443")]));
        let private = vec![sock("10.0.0.1:443"), sock("127.0.0.1:443")];
        let first: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            g.select("h", private),
            Err(GuardError::ForbiddenAddress(first))
        );
        assert_eq!(
            g.select("h", vec![]),
            Err(GuardError::NoAddress("h".into()))
        );
    }

    #[tokio::test]
    async fn resolve_localhost() {
        let url = guard(&["127.0.0.0/8"])
            .check_url("https://localhost:9000/")
            .unwrap();
        let refused = Guard::default().resolve(&url).await.unwrap_err();
        assert_eq!(refused.kind(), "forbidden_host");

        let addrs = guard(&["127.0.0.0/8"]).resolve(&url).await.unwrap();
        assert!(!addrs.is_empty());
        assert!(addrs
            .iter()
            .all(|a| a.ip().is_loopback() && a.is_ipv4() && a.port() == 9000));

        match guard(&["::1/128"]).resolve(&url).await {
            Ok(addrs) => assert!(addrs.iter().all(|a| a.ip() == Ipv6Addr::LOCALHOST)),
            Err(GuardError::ForbiddenAddress(ip)) => assert!(ip.is_loopback()),
            Err(e) => panic!("unexpected {e:?}"),
        }
    }

    #[tokio::test]
    async fn resolve_literal_and_failure() {
        let url = Guard::default()
            .check_url("https://8.8.8.8:8443/x")
            .unwrap();
        let addrs = Guard::default().resolve(&url).await.unwrap();
        assert_eq!(addrs, vec![sock("8.8.8.8:8443")]);

        let url = guard(&["127.0.0.0/8"])
            .check_url("https://127.0.0.1/")
            .unwrap();
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let err = Guard::default().resolve(&url).await.unwrap_err();
        assert_eq!(err, GuardError::ForbiddenAddress(ip));

        let url = Guard::default()
            .check_url("https://no-such-host.invalid/")
            .unwrap();
        let err = Guard::default().resolve(&url).await.unwrap_err();
        assert!(matches!(err.kind(), "resolve" | "no_address"), "{err:?}");
    }

    /// The registries as written in the specification, parsed independently of the tables.
    const REGISTRY_V4: &[&str] = &[
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.31.196.0/24",
        "192.52.193.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "192.175.48.0/24",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "255.255.255.255/32",
    ];
    const REGISTRY_V6: &[&str] = &[
        "::/128",
        "::1/128",
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/23",
        "2001::/32",
        "2001:db8::/32",
        "3fff::/20",
        "5f00::/16",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    ];

    fn registry() -> Vec<IpNet> {
        let all = REGISTRY_V4.iter().chain(REGISTRY_V6);
        all.map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn tables_match_registry() {
        let tables = V4_SPECIAL.iter().map(|(n, _)| IpNet::V4(*n));
        let tables: Vec<IpNet> = tables
            .chain(V6_SPECIAL.iter().map(|(n, _)| IpNet::V6(*n)))
            .collect();
        assert_eq!(tables, registry());
    }

    /// xorshift64: deterministic and dependency-free.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn u128(&mut self) -> u128 {
            (u128::from(self.next()) << 64) | u128::from(self.next())
        }

        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[(self.next() % items.len() as u64) as usize]
        }
    }

    /// A random address: half of the time inside a random registry range.
    fn random_ip(rng: &mut Rng, nets: &[IpNet], v6: bool) -> IpAddr {
        let bits = rng.u128();
        let candidates: Vec<&IpNet> = nets.iter().filter(|n| n.addr().is_ipv6() == v6).collect();
        match (rng.next() & 1 == 0, v6) {
            (true, _) => match **rng.pick(&candidates) {
                IpNet::V4(n) => within_v4(n, bits as u32).into(),
                IpNet::V6(n) => within_v6(n, bits).into(),
            },
            (false, false) => Ipv4Addr::from(bits as u32).into(),
            (false, true) => Ipv6Addr::from(bits).into(),
        }
    }

    fn within_v4(net: Ipv4Net, bits: u32) -> Ipv4Addr {
        Ipv4Addr::from(net.network().to_bits() | (bits & net.hostmask().to_bits()))
    }

    fn within_v6(net: Ipv6Net, bits: u128) -> Ipv6Addr {
        Ipv6Addr::from(net.network().to_bits() | (bits & net.hostmask().to_bits()))
    }

    /// Every IPv6 form that embeds `v4`, with random filler bits where the form has any.
    fn embeddings(v4: Ipv4Addr, filler: u128) -> [Ipv6Addr; 5] {
        let v4 = u128::from(v4.to_bits());
        let teredo_middle = filler & (u128::from(u64::MAX) << 32);
        let six_to_four_tail = filler & ((1u128 << 80) - 1);
        [
            Ipv6Addr::from((0xffffu128 << 32) | v4),
            Ipv6Addr::from((0x64_ff9bu128 << 96) | v4),
            Ipv6Addr::from(v4),
            Ipv6Addr::from((0x2002u128 << 112) | (v4 << 80) | six_to_four_tail),
            Ipv6Addr::from((0x2001u128 << 112) | teredo_middle | (!v4 & 0xffff_ffff)),
        ]
    }

    #[test]
    fn property_registry_ranges_are_never_public() {
        let nets = registry();
        let private_v4: Vec<Ipv4Net> = REGISTRY_V4.iter().map(|n| n.parse().unwrap()).collect();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..100_000 {
            for v6 in [false, true] {
                let ip = random_ip(&mut rng, &nets, v6);
                if nets.iter().any(|n| n.contains(&ip)) {
                    assert!(!is_public(ip), "{ip} is in a registry range");
                }
            }
            let inner = within_v4(*rng.pick(&private_v4), rng.next() as u32);
            for form in embeddings(inner, rng.u128()) {
                assert!(!is_public(form.into()), "{form} embeds {inner}");
            }
        }
    }

    #[test]
    fn property_embedded_forms_follow_ipv4() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..100_000 {
            let inner = Ipv4Addr::from(rng.next() as u32);
            let [mapped, nat64, compat, six_to_four, teredo] = embeddings(inner, rng.u128());
            let expected = is_public(inner.into());
            for form in [mapped, nat64, six_to_four] {
                assert_eq!(is_public(form.into()), expected, "{form} embeds {inner}");
            }
            if compat.to_bits() > 1 {
                assert_eq!(
                    is_public(compat.into()),
                    expected,
                    "{compat} embeds {inner}"
                );
            }
            assert!(!is_public(teredo.into()), "Teredo {teredo}");
        }
    }

    /// A resolver whose answers are scripted one lookup at a time; it records every lookup.
    #[derive(Default)]
    struct Script {
        answers: std::sync::Mutex<std::collections::VecDeque<io::Result<Vec<IpAddr>>>>,
        asked: std::sync::Mutex<Vec<(String, u16)>>,
    }

    impl Script {
        fn answer(&self, ips: &[&str]) {
            let ips = ips.iter().map(|ip| ip.parse().unwrap()).collect();
            self.answers.lock().unwrap().push_back(Ok(ips));
        }

        fn fail(&self) {
            let error = io::Error::new(io::ErrorKind::NotFound, "no such host");
            self.answers.lock().unwrap().push_back(Err(error));
        }

        fn asked(&self) -> Vec<(String, u16)> {
            self.asked.lock().unwrap().clone()
        }
    }

    /// `guard` looking names up in a fresh script.
    fn scripted(guard: Guard) -> (Guard, Arc<Script>) {
        let script = Arc::new(Script::default());
        let answers = Arc::clone(&script);
        let guard = guard.with_lookup(move |host: &str, port: u16| {
            answers.asked.lock().unwrap().push((host.to_owned(), port));
            let answer = answers.answers.lock().unwrap().pop_front();
            let answer = answer.expect("a lookup nobody scripted");
            Box::pin(async move {
                let ips = answer?;
                Ok(ips
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect())
            })
        });
        (guard, script)
    }

    fn socks(addrs: &[&str]) -> Vec<SocketAddr> {
        addrs.iter().map(|a| sock(a)).collect()
    }

    #[tokio::test]
    async fn each_lookup_is_judged_afresh_when_answers_change() {
        let (g, script) = scripted(Guard::default());
        let url = g.check_url("https://rebind.example:8443/hook").unwrap();

        // Public only: every address comes back, exactly as looked up.
        script.answer(&["93.184.215.14", "2606:4700::1111"]);
        let addrs = g.resolve(&url).await.unwrap();
        assert_eq!(
            addrs,
            socks(&["93.184.215.14:8443", "[2606:4700::1111]:8443"])
        );

        // Mixed: the private and embedded-loopback addresses are dropped.
        script.answer(&["10.0.0.1", "8.8.8.8", "::ffff:127.0.0.1", "8.8.8.8"]);
        let addrs = g.resolve(&url).await.unwrap();
        assert_eq!(addrs, socks(&["8.8.8.8:8443"]));

        // Rebound to private addresses only: refused with the first of them.
        script.answer(&["127.0.0.1", "169.254.169.254"]);
        let refused = g.resolve(&url).await.unwrap_err();
        assert_eq!(
            refused,
            GuardError::ForbiddenAddress("127.0.0.1".parse().unwrap())
        );
        assert_eq!(refused.kind(), "forbidden_address");

        script.answer(&[]);
        let empty = g.resolve(&url).await.unwrap_err();
        assert_eq!(empty, GuardError::NoAddress("rebind.example".into()));

        script.fail();
        assert_eq!(g.resolve(&url).await.unwrap_err().kind(), "resolve");

        // One lookup per attempt, of the stored host and port.
        let once = ("rebind.example".to_owned(), 8443);
        assert_eq!(script.asked(), vec![once; 5]);
    }

    #[tokio::test]
    async fn the_connector_path_hands_back_only_checked_addresses() {
        let (g, script) = scripted(guard(&["192.168.7.0/24"]));
        script.answer(&["192.168.7.9", "192.168.8.1", "fe80::1", "1.1.1.1"]);
        let addrs = g.resolve_host("rebind.example", 0).await.unwrap();
        assert_eq!(addrs, socks(&["192.168.7.9:0", "1.1.1.1:0"]));

        script.answer(&["192.168.8.1", "::1"]);
        let refused = g.resolve_host("rebind.example", 0).await.unwrap_err();
        assert_eq!(refused.kind(), "forbidden_address");

        let refused = g.resolve_host("localhost", 0).await.unwrap_err();
        assert_eq!(refused.kind(), "forbidden_host");
        assert_eq!(script.asked().len(), 2, "localhost must not be looked up");
    }

    #[tokio::test]
    async fn an_allow_listed_host_name_keeps_all_its_addresses() {
        let (g, script) = scripted(guard(&["hooks.internal.example"]));
        let listed = g.check_url("https://Hooks.Internal.Example./x").unwrap();
        script.answer(&["10.0.0.7", "127.0.0.1", "10.0.0.7", "8.8.8.8"]);
        let addrs = g.resolve(&listed).await.unwrap();
        assert_eq!(
            addrs,
            socks(&["10.0.0.7:443", "127.0.0.1:443", "8.8.8.8:443"])
        );

        script.answer(&["169.254.169.254"]);
        let addrs = g.resolve_host("hooks.internal.example", 0).await.unwrap();
        assert_eq!(addrs, socks(&["169.254.169.254:0"]));

        // Other names, even under the listed one, are still judged by address.
        let other = g.check_url("https://a.hooks.internal.example/").unwrap();
        script.answer(&["10.0.0.7"]);
        assert_eq!(
            g.resolve(&other).await.unwrap_err().kind(),
            "forbidden_address"
        );

        script.answer(&[]);
        let empty = g.resolve(&listed).await.unwrap_err();
        assert_eq!(empty.kind(), "no_address");
    }

    #[tokio::test]
    async fn literal_hosts_are_never_looked_up() {
        let (g, script) = scripted(Guard::default());
        let url = g.check_url("https://8.8.8.8:8443/x").unwrap();
        assert_eq!(g.resolve(&url).await.unwrap(), socks(&["8.8.8.8:8443"]));
        let addrs = g.resolve_host("[2606:4700::1111]", 0).await.unwrap();
        assert_eq!(addrs, socks(&["[2606:4700::1111]:0"]));
        let refused = g.resolve_host("[::ffff:10.0.0.1]", 0).await.unwrap_err();
        assert_eq!(refused.kind(), "forbidden_address");
        assert!(script.asked().is_empty());
    }

    use crate::delivery::client::AttemptResult;

    /// A plain TCP listener on loopback that counts the connections it accepts and closes
    /// each at once (so the TLS handshake fails fast).
    async fn counting_listener() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(stream);
            }
        });
        (port, accepted)
    }

    async fn send_through_client(guard: Guard, url: &str) -> AttemptResult {
        use crate::delivery::client::{tls_config, CallbackClient};
        let tls = tls_config(None).unwrap();
        let budget = std::time::Duration::from_secs(5);
        let client = CallbackClient::new(guard, budget, tls).unwrap();
        let signing = crate::store::Signing {
            secrets: vec!["whsec_dGVzdA==".into()],
            standard_webhooks: false,
        };
        client.send(url, "evt_1", b"{}", &signing).await
    }

    #[tokio::test]
    async fn the_client_connects_only_to_addresses_the_guard_checked() {
        let (port, accepted) = counting_listener().await;
        let connections = || accepted.load(std::sync::atomic::Ordering::SeqCst);
        let url = format!("https://hooks.test:{port}/hook");

        // Loopback is not allowed: refused before any connection is made.
        let (g, script) = scripted(Guard::default());
        script.answer(&["127.0.0.1", "192.168.0.1"]);
        let result = send_through_client(g, &url).await;
        assert_eq!(result.error_kind, Some("forbidden_address"), "{result:?}");
        assert!(result.refused());
        assert_eq!(script.asked().len(), 1);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(connections(), 0);

        // Loopback allowed by range: the unreachable private address is filtered out, so
        // the only connection goes to the listener.
        let (g, script) = scripted(guard(&["127.0.0.0/8"]));
        script.answer(&["10.255.255.1", "127.0.0.1"]);
        let result = send_through_client(g, &url).await;
        assert!(!result.refused(), "{result:?}");
        assert_eq!(script.asked().len(), 1);
        assert_eq!(connections(), 1);

        // Allowed by name: every address of the name may be contacted.
        let (g, script) = scripted(guard(&["hooks.test"]));
        script.answer(&["127.0.0.1"]);
        let result = send_through_client(g, &url).await;
        assert!(!result.refused(), "{result:?}");
        assert_eq!(script.asked().len(), 1);
        assert_eq!(connections(), 2);
    }

    /// Property tests: random literal hosts, in every notation the URL parser accepts, are
    /// accepted exactly when an oracle written from the IANA registries calls them public.
    mod property {
        use super::*;
        use futures_util::FutureExt;
        use proptest::prelude::*;

        /// The IPv4 address an IPv6 address carries, read from its 16-bit groups.
        fn oracle_unwrap(ip: Ipv6Addr) -> Option<Ipv4Addr> {
            let s = ip.segments();
            let v4 = |hi: u16, lo: u16| {
                let [a, b] = hi.to_be_bytes();
                let [c, d] = lo.to_be_bytes();
                Ipv4Addr::new(a, b, c, d)
            };
            match s {
                [0, 0, 0, 0, 0, 0xffff, hi, lo] => Some(v4(hi, lo)),
                [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
                [0, 0, 0, 0, 0, 0, 0, 0 | 1] => None,
                [0, 0, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
                [0x2002, hi, lo, ..] => Some(v4(hi, lo)),
                _ => None,
            }
        }

        fn in_registry(ip: IpAddr) -> bool {
            registry().iter().any(|net| net.contains(&ip))
        }

        /// Public: in no registry range, itself or the IPv4 address it embeds, and for IPv6
        /// without an embedded address, inside 2000::/3.
        fn oracle_public(ip: IpAddr) -> bool {
            if in_registry(ip) {
                return false;
            }
            match ip {
                IpAddr::V4(_) => true,
                IpAddr::V6(v6) => match oracle_unwrap(v6) {
                    Some(inner) => !in_registry(inner.into()),
                    None => v6.segments()[0] & 0xe000 == 0x2000,
                },
            }
        }

        fn any_v4() -> impl Strategy<Value = Ipv4Addr> {
            let special = (0..REGISTRY_V4.len(), any::<u32>())
                .prop_map(|(i, bits)| within_v4(REGISTRY_V4[i].parse().unwrap(), bits));
            prop_oneof![any::<u32>().prop_map(Ipv4Addr::from), special]
        }

        /// Addresses biased toward the special ranges and the IPv4-embedding forms.
        fn any_ip() -> impl Strategy<Value = IpAddr> {
            let special_v6 = (0..REGISTRY_V6.len(), any::<u128>())
                .prop_map(|(i, bits)| within_v6(REGISTRY_V6[i].parse().unwrap(), bits));
            let embedded = (any_v4(), 0..5usize, any::<u128>())
                .prop_map(|(v4, form, filler)| embeddings(v4, filler)[form]);
            let global =
                any::<u128>().prop_map(|bits| within_v6("2000::/3".parse().unwrap(), bits));
            prop_oneof![
                2 => any_v4().prop_map(IpAddr::V4),
                1 => any::<u128>().prop_map(|bits| IpAddr::V6(bits.into())),
                1 => global.prop_map(IpAddr::V6),
                2 => special_v6.prop_map(IpAddr::V6),
                3 => embedded.prop_map(IpAddr::V6),
            ]
        }

        /// The address as URL hosts in several notations.
        fn notations(ip: IpAddr) -> Vec<String> {
            match ip {
                IpAddr::V4(v4) => {
                    let n = v4.to_bits();
                    let [a, b, c, d] = v4.octets();
                    vec![
                        format!("{a}.{b}.{c}.{d}"),
                        format!("{n}"),
                        format!("0x{n:x}"),
                        format!("0X{n:08X}"),
                        format!("0{n:o}"),
                        format!("0{a:o}.0{b:o}.0{c:o}.0{d:o}"),
                        format!("0x{a:x}.0x{b:02x}.{c}.0{d:o}"),
                        format!("{a}.{b}.{}", n & 0xffff),
                        format!("{a}.0x{:x}", n & 0xff_ffff),
                        format!("{a}.{b}.{c}.{d}."),
                    ]
                }
                IpAddr::V6(v6) => {
                    let s = v6.segments();
                    let full = s.map(|g| format!("{g:04x}")).join(":");
                    let [a, b, c, d] = (v6.to_bits() as u32).to_be_bytes();
                    let head = s[..6].iter().map(|g| format!("{g:X}")).collect::<Vec<_>>();
                    vec![
                        format!("[{v6}]"),
                        format!("[{full}]"),
                        format!("[{}]", full.to_uppercase()),
                        format!("[{}:{a}.{b}.{c}.{d}]", head.join(":")),
                    ]
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn literal_hosts_are_accepted_exactly_when_public(
                ip in any_ip(),
                port in proptest::option::of(1..=u16::MAX),
            ) {
                let guard = Guard::default();
                let public = oracle_public(ip);
                let port = port.map(|p| format!(":{p}")).unwrap_or_default();
                for host in notations(ip) {
                    let raw = format!("https://{host}{port}/hook");
                    let parsed = Url::parse(&raw).unwrap();
                    prop_assert_eq!(literal_ip(&parsed), Some(ip), "{} parses elsewhere", raw);

                    match guard.check_url(&raw) {
                        Ok(url) => {
                            prop_assert!(public, "{} accepted", raw);
                            prop_assert!(!in_registry(ip), "{} accepted", raw);
                            prop_assert_eq!(literal_ip(url.url()), Some(ip));
                        }
                        Err(error) => {
                            prop_assert!(!public, "{} refused: {}", raw, error);
                            prop_assert_eq!(error, GuardError::ForbiddenAddress(ip));
                        }
                    }
                }
            }

            #[test]
            fn an_allow_listed_range_admits_its_addresses_and_no_others(
                ip in any_ip(),
                net in (0..REGISTRY_V4.len() + REGISTRY_V6.len()).prop_map(|i| registry()[i]),
            ) {
                let guard = Guard::new(vec![AllowEntry::Net(net)]);
                // The allow-list also sees the client address inside a Teredo address.
                let inner = match ip {
                    IpAddr::V6(v6) => match v6.segments() {
                        [0x2001, 0, ..] => Some(Ipv4Addr::from(!(v6.to_bits() as u32))),
                        _ => oracle_unwrap(v6),
                    },
                    IpAddr::V4(_) => None,
                };
                let inner_listed = inner.is_some_and(|i| net.contains(&IpAddr::V4(i)));
                let listed = net.contains(&ip) || inner_listed;
                for host in notations(ip) {
                    let raw = format!("https://{host}/");
                    let accepted = guard.check_url(&raw).is_ok();
                    prop_assert_eq!(accepted, listed || oracle_public(ip), "{}", raw);
                }
            }

            #[test]
            fn resolved_names_never_reach_a_refused_address(
                ips in proptest::collection::vec(any_ip(), 0..8),
                port in 1..=u16::MAX,
            ) {
                let (guard, script) = scripted(Guard::default());
                let answer: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
                script.answer(&answer.iter().map(String::as_str).collect::<Vec<_>>());
                let resolved = guard.resolve_host("random.example", port).now_or_never();
                let resolved = resolved.expect("a scripted lookup is ready at once");

                let mut want: Vec<SocketAddr> = Vec::new();
                for ip in ips.iter().filter(|ip| oracle_public(**ip)) {
                    let addr = SocketAddr::new(*ip, port);
                    if !want.contains(&addr) {
                        want.push(addr);
                    }
                }
                match resolved {
                    Ok(addrs) => prop_assert_eq!(addrs, want),
                    Err(GuardError::ForbiddenAddress(first)) => {
                        prop_assert!(want.is_empty());
                        prop_assert_eq!(Some(&first), ips.first());
                    }
                    Err(GuardError::NoAddress(_)) => prop_assert!(ips.is_empty()),
                    Err(other) => prop_assert!(false, "unexpected {:?}", other),
                }
                prop_assert_eq!(script.asked().len(), 1);
            }
        }
    }
}
