//! Where a webhook may be sent: a merchant's URL is resolved and every address it resolves to is
//! checked before the server connects to it, so a merchant cannot aim the dispatcher at the
//! server's own network (loopback, private, link-local, unique-local, CGNAT, multicast,
//! unspecified, reserved, and the IPv4-mapped / IPv4-compatible / NAT64 forms of them, and the
//! local-use NAT64 prefix `64:ff9b:1::/48` whole).
//!
//! * The URL is parsed by the WHATWG rules ([`reqwest::Url`]), which also read the decimal, hex
//!   and octal IPv4 spellings (`http://2130706433/`, `http://0x7f.1/`, `http://017700000001/`)
//!   as the address they mean; the check sees that address.
//! * [`check`] runs when the URL is set and again before every delivery; the delivery then
//!   connects only to the addresses [`check`] returned (the HTTP client's resolver is pinned to
//!   them), so a DNS answer that changes between the check and the connection (rebinding) is
//!   never used.
//! * `allow_private` (`merchant.allow_private_webhooks`, `MEDIATOR_ALLOW_PRIVATE_WEBHOOKS=1`; off
//!   by default) lets a shop's own network and tests through; the address is still pinned.
//!
//! * The server's code calls [`check_bounded`], never [`check`] on a blocking thread of its
//!   own: the system resolver blocks a thread for as long as a DNS server takes to answer, and a
//!   merchant who names hosts on a server that answers late (one new name per request, so no
//!   cache helps) would otherwise hold the runtime's whole blocking pool (merchant database,
//!   custody) with a few hundred settings requests. Deliveries and URLs being set have
//!   budgets of their own, so that neither can take the other's ([`Purpose`]): at most
//!   [`MAX_DELIVERY_LOOKUPS`] for deliveries, [`MAX_DELIVERY_LOOKUPS_PER_MERCHANT`] of them a
//!   merchant's (a delivery that finds none, or waits [`LOOKUP_TIMEOUT`] for its slot and
//!   answer, is "does not resolve", retried on the outbox's schedule), and at most
//!   [`MAX_SETTINGS_LOOKUPS`] for URLs being set, one per merchant, answered at once when there
//!   is no slot ([`TargetError::Busy`]).
//!
//! **Invariant:** with `allow_private` off, no delivery opens a connection to an address that
//! [`is_internal`] calls internal.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

/// Delivery checks (and so resolver look-ups, each holding a blocking thread) in flight at
/// once, process-wide ([`check_bounded`]); a merchant has at most two deliveries in flight.
pub const MAX_DELIVERY_LOOKUPS: usize = 32;

/// Checks of URLs being set (store settings, Greenfield webhooks) in flight at once,
/// process-wide, and at most one per merchant ([`check_bounded`]).
pub const MAX_SETTINGS_LOOKUPS: usize = 16;

/// How long [`check_bounded`] waits for a slot and the answer before it calls the host
/// unresolved.
pub const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Look-ups a merchant's deliveries hold at once (a look-up's slot is held until it returns,
/// however long after its delivery gave up: without this, a merchant whose DNS never answers
/// would take more slots with every retry).
pub const MAX_DELIVERY_LOOKUPS_PER_MERCHANT: usize = 2;

/// What a check is for: each has its own budget of look-ups ([`check_bounded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A delivery's check before it connects.
    Delivery {
        /// The merchant it is for.
        merchant: u32,
    },
    /// A URL a merchant is setting.
    Settings {
        /// The merchant setting it.
        merchant: u32,
    },
}

/// The look-up budgets ([`check_bounded`]).
#[derive(Debug)]
struct Budgets {
    delivery: Arc<tokio::sync::Semaphore>,
    settings: Arc<tokio::sync::Semaphore>,
    /// Merchants with a settings check in flight.
    merchants: Arc<std::sync::Mutex<std::collections::HashSet<u32>>>,
    /// Look-ups held by each merchant's deliveries.
    deliveries: Arc<std::sync::Mutex<std::collections::HashMap<u32, usize>>>,
}

impl Budgets {
    fn new(delivery: usize, settings: usize) -> Self {
        Self {
            delivery: Arc::new(tokio::sync::Semaphore::new(delivery)),
            settings: Arc::new(tokio::sync::Semaphore::new(settings)),
            merchants: Arc::default(),
            deliveries: Arc::default(),
        }
    }
}

/// A merchant's settings check in flight, until the look-up returns.
struct MerchantCheck {
    merchants: Arc<std::sync::Mutex<std::collections::HashSet<u32>>>,
    merchant: u32,
}

impl Drop for MerchantCheck {
    fn drop(&mut self) {
        self.merchants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.merchant);
    }
}

/// A merchant's delivery look-up held, until it returns.
struct DeliveryLookUp {
    deliveries: Arc<std::sync::Mutex<std::collections::HashMap<u32, usize>>>,
    merchant: u32,
}

impl Drop for DeliveryLookUp {
    fn drop(&mut self) {
        let mut held = self.deliveries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.merchant) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.merchant);
            }
        }
    }
}

/// [`check`] on the blocking pool within a budget: a slot of the purpose's (and for a URL being
/// set, the merchant's one), held until the look-up returns, however long after the caller gave
/// up. A delivery waits at most [`LOOKUP_TIMEOUT`] for its slot and as long for the answer (then
/// [`TargetError::Unresolved`]); a URL being set gets no slot to wait for: none free, or the
/// merchant's in use, is [`TargetError::Busy`] at once.
pub async fn check_bounded(
    url: String,
    policy: TargetPolicy,
    purpose: Purpose,
) -> Result<Target, TargetError> {
    static BUDGETS: std::sync::OnceLock<Budgets> = std::sync::OnceLock::new();
    let budgets = BUDGETS.get_or_init(|| Budgets::new(MAX_DELIVERY_LOOKUPS, MAX_SETTINGS_LOOKUPS));
    check_within(url, policy, purpose, budgets, LOOKUP_TIMEOUT).await
}

async fn check_within(
    url: String,
    policy: TargetPolicy,
    purpose: Purpose,
    budgets: &Budgets,
    limit: std::time::Duration,
) -> Result<Target, TargetError> {
    let held: Box<dyn Send> = match purpose {
        Purpose::Delivery { merchant } => {
            {
                let mut held = budgets.deliveries.lock().unwrap_or_else(|e| e.into_inner());
                let n = held.entry(merchant).or_default();
                if *n >= MAX_DELIVERY_LOOKUPS_PER_MERCHANT {
                    return Err(TargetError::Unresolved);
                }
                *n += 1;
            }
            let mine = DeliveryLookUp {
                deliveries: budgets.deliveries.clone(),
                merchant,
            };
            let slots = budgets.delivery.clone();
            match tokio::time::timeout(limit, slots.acquire_owned()).await {
                Ok(Ok(slot)) => Box::new((slot, mine)),
                _ => return Err(TargetError::Unresolved),
            }
        }
        Purpose::Settings { merchant } => {
            if !budgets
                .merchants
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(merchant)
            {
                return Err(TargetError::Busy);
            }
            let mine = MerchantCheck {
                merchants: budgets.merchants.clone(),
                merchant,
            };
            let slot = budgets
                .settings
                .clone()
                .try_acquire_owned()
                .map_err(|_| TargetError::Busy)?;
            Box::new((slot, mine))
        }
    };
    let work = tokio::task::spawn_blocking(move || {
        let _held = held;
        check(&url, &policy)
    });
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(r)) => r,
        _ => Err(TargetError::Unresolved),
    }
}

/// Resolves a host name to addresses (blocking; called on the blocking pool). Tests pass a
/// table so nothing leaves the machine.
pub type ResolveFn = dyn Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>> + Send + Sync;

/// The rule for webhook targets: whether internal addresses are allowed, and how host names are
/// resolved.
#[derive(Clone)]
pub struct TargetPolicy {
    /// Allow internal addresses (a shop's own network, tests). Off by default.
    pub allow_private: bool,
    /// The resolver (default: the system's, through `getaddrinfo`).
    pub resolver: Arc<ResolveFn>,
}

impl Default for TargetPolicy {
    fn default() -> Self {
        Self {
            allow_private: false,
            resolver: Arc::new(system_resolve),
        }
    }
}

impl fmt::Debug for TargetPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetPolicy")
            .field("allow_private", &self.allow_private)
            .finish_non_exhaustive()
    }
}

impl TargetPolicy {
    /// Internal addresses allowed, the system resolver (a shop's own network; tests on
    /// 127.0.0.1).
    pub fn allow_private() -> Self {
        Self {
            allow_private: true,
            ..Self::default()
        }
    }

    /// This policy with `resolver` (tests: a fixed table).
    pub fn with_resolver(mut self, resolver: Arc<ResolveFn>) -> Self {
        self.resolver = resolver;
        self
    }
}

/// A resolver for the HTTP client that answers the checked addresses for any name: the client
/// can connect nowhere else, whatever the name resolves to by then.
#[derive(Debug, Clone)]
pub struct Pinned(pub Vec<SocketAddr>);

impl reqwest::dns::Resolve for Pinned {
    fn resolve(&self, _name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let addrs = self.0.clone();
        Box::pin(async move {
            let it: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(it)
        })
    }
}

fn system_resolve(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    Ok((host, port).to_socket_addrs()?.collect())
}

/// Why a webhook URL is refused. The messages are short and name no address, so the delivery
/// log cannot be used to map the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// Not an absolute `http(s)://host[:port]/...` URL, or it carries credentials.
    #[error("not an http(s) URL")]
    BadUrl,
    /// The host does not resolve.
    #[error("host does not resolve")]
    Unresolved,
    /// The host is, or resolves to, an internal address.
    #[error("address not allowed")]
    Internal,
    /// Too many checks of URLs being set at once (the merchant's, or everyone's): nothing was
    /// looked up; asked again later it is.
    #[error("too many checks at once")]
    Busy,
}

/// A checked target: the URL, its host as written (for the HTTP `Host` header and TLS), and
/// the addresses the delivery may connect to.
#[derive(Debug, Clone)]
pub struct Target {
    /// The parsed URL.
    pub url: reqwest::Url,
    /// The host name as the URL has it (`None` when the host is an IP literal).
    pub host: Option<String>,
    /// Every address checked (at least one).
    pub addrs: Vec<SocketAddr>,
}

/// Parses `url`, resolves its host with `policy.resolver` (blocking) and checks every address.
/// A host that resolves to several addresses is refused if any of them is internal (the client
/// could pick any).
pub fn check(url: &str, policy: &TargetPolicy) -> Result<Target, TargetError> {
    let url = reqwest::Url::parse(url).map_err(|_| TargetError::BadUrl)?;
    if !matches!(url.scheme(), "http" | "https")
        || !url.username().is_empty()
        || url.password().is_some()
    {
        return Err(TargetError::BadUrl);
    }
    let port = url.port_or_known_default().ok_or(TargetError::BadUrl)?;
    // After WHATWG parsing an IPv4 host in any spelling is dotted decimal, an IPv6 one bracketed.
    let h = url.host_str().ok_or(TargetError::BadUrl)?;
    let literal = match h.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => Some(IpAddr::V6(v6.parse().map_err(|_| TargetError::BadUrl)?)),
        None => h.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
    };
    let (host, addrs) = match literal {
        Some(ip) => (None, vec![SocketAddr::new(ip, port)]),
        None => {
            let d = h.trim_end_matches('.');
            if d.is_empty() {
                return Err(TargetError::BadUrl);
            }
            let addrs = (policy.resolver)(d, port).map_err(|_| TargetError::Unresolved)?;
            if addrs.is_empty() {
                return Err(TargetError::Unresolved);
            }
            (Some(h.to_owned()), addrs)
        }
    };
    if !policy.allow_private && addrs.iter().any(|a| is_internal(a.ip())) {
        return Err(TargetError::Internal);
    }
    // The port the URL names, whatever the resolver put in.
    let addrs = addrs
        .into_iter()
        .map(|a| SocketAddr::new(a.ip(), port))
        .collect();
    Ok(Target { url, host, addrs })
}

/// Whether `ip` is not a public unicast address: loopback, private, link-local, unique-local,
/// shared (CGNAT), multicast, broadcast, unspecified, documentation, benchmarking, reserved;
/// IPv6 forms that embed an IPv4 address (mapped, compatible, NAT64, 6to4) are judged by that
/// address.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => is_internal_v6(v6),
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240 // reserved
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_internal_v4(v4);
    }
    // IPv4-compatible (::a.b.c.d, deprecated) and NAT64 (64:ff9b::/96): the embedded address.
    if (s[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified())
        || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
    {
        let [_, _, _, _, _, _, hi, lo] = s;
        let v4 = Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
        return is_internal_v4(v4);
    }
    // 6to4 (2002::/16): the IPv4 address in bits 16..48.
    if s[0] == 0x2002 {
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        return is_internal_v4(v4);
    }
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x2001 && s[1] < 0x0200) // IETF protocol assignments (Teredo, ORCHID...)
        || s[0] == 0x0100 && s[1..4] == [0, 0, 0] // discard-only 100::/64
        // Local-use NAT64 64:ff9b:1::/48 (RFC 8215, not globally reachable): a translator on
        // the server's own network, to whatever IPv4 address it embeds (where, depends on
        // the prefix length the operator chose).
        || s[..3] == [0x64, 0xff9b, 0x0001]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counters of [`slow_resolver`]: look-ups in flight (`now`), their most (`peak`), and
    /// whether the DNS server answers (`open`).
    type Counters = (
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::atomic::AtomicBool>,
    );

    /// A resolver that answers only once `open` is set (10 s at most), and its counters.
    fn slow_resolver() -> (TargetPolicy, Counters) {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let (now, peak, open) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let counters = (now.clone(), peak.clone(), open.clone());
        let policy = TargetPolicy::default().with_resolver(Arc::new(move |_: &str, port| {
            let in_flight = now.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(in_flight, Ordering::SeqCst);
            for _ in 0..1_000 {
                if open.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            now.fetch_sub(1, Ordering::SeqCst);
            Ok(vec![SocketAddr::new(
                "93.184.216.34".parse().unwrap(),
                port,
            )])
        }));
        (policy, counters)
    }

    /// Review finding: the settings and Greenfield webhook routes resolved a merchant's URL on a
    /// blocking thread each, with no bound: host names on a DNS server that answers late held
    /// the runtime's whole blocking pool. Deliveries: at most their budget of look-ups at once,
    /// the others giving up as "does not resolve" when the time is up; once the slow look-ups
    /// return, checks go through again. A second review: with one budget for both, a merchant
    /// setting URLs on a slow DNS server starved every store's deliveries; they are apart now.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delivery_look_ups_are_bounded_and_late_ones_give_up() {
        use std::sync::atomic::Ordering;
        let (policy, (now, peak, open)) = slow_resolver();
        let budgets = Arc::new(Budgets::new(3, 2));
        let limit = std::time::Duration::from_millis(500);
        let check = |merchant: u32| {
            let (p, b) = (policy.clone(), budgets.clone());
            tokio::spawn(async move {
                check_within(
                    format!("https://slow{merchant}.example/"),
                    p,
                    Purpose::Delivery { merchant },
                    &b,
                    limit,
                )
                .await
            })
        };
        // Merchant 1 holds two look-ups; its third is refused at once, not queued.
        let (a, b) = (check(1), check(1));
        while now.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(matches!(
            check(1).await.unwrap(),
            Err(TargetError::Unresolved)
        ));
        // Two other merchants: one gets the last slot, the other waits and gives up.
        let (c, d) = (check(2), check(3));
        for call in [a, b, c, d] {
            assert!(matches!(call.await.unwrap(), Err(TargetError::Unresolved)));
        }
        assert_eq!(peak.load(Ordering::SeqCst), 3, "look-ups at once");
        // Given up by their deliveries, the slow look-ups still hold their slots and merchant 1
        // its two places until they return: a retry does not take more.
        assert!(matches!(
            check(1).await.unwrap(),
            Err(TargetError::Unresolved)
        ));
        assert_eq!(peak.load(Ordering::SeqCst), 3);
        // The settings budget is untouched by the deliveries' (its look-up is in flight too).
        let p2 = policy.clone();
        let b2 = budgets.clone();
        let setting = tokio::spawn(async move {
            check_within(
                "https://mine.example/".into(),
                p2,
                Purpose::Settings { merchant: 7 },
                &b2,
                std::time::Duration::from_secs(10),
            )
            .await
        });
        while now.load(Ordering::SeqCst) < 4 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        open.store(true, Ordering::SeqCst);
        assert!(setting.await.unwrap().is_ok());
        // Once the slow look-ups returned, merchant 1's places are free again.
        while !budgets
            .deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let t = check_within(
            "https://fast.example/".into(),
            policy,
            Purpose::Delivery { merchant: 1 },
            &budgets,
            std::time::Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(t.addrs, vec!["93.184.216.34:443".parse().unwrap()]);
    }

    /// URLs being set: one check per merchant at once, and none waits for a slot (`Busy` at
    /// once, nothing looked up); another merchant is not held back by the first's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn settings_look_ups_are_one_per_merchant_and_never_wait() {
        use std::sync::atomic::Ordering;
        let (policy, (now, peak, open)) = slow_resolver();
        let budgets = Arc::new(Budgets::new(2, 2));
        let start = |merchant: u32| {
            let (p, b) = (policy.clone(), budgets.clone());
            tokio::spawn(async move {
                check_within(
                    format!("https://m{merchant}.example/"),
                    p,
                    Purpose::Settings { merchant },
                    &b,
                    std::time::Duration::from_secs(10),
                )
                .await
            })
        };
        let first = start(1);
        while now.load(Ordering::SeqCst) < 1 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(matches!(start(1).await.unwrap(), Err(TargetError::Busy)));
        let second = start(2);
        while now.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // Both slots taken: a third merchant is answered at once.
        assert!(matches!(start(3).await.unwrap(), Err(TargetError::Busy)));
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        open.store(true, Ordering::SeqCst);
        assert!(first.await.unwrap().is_ok());
        assert!(second.await.unwrap().is_ok());
        // Their slots and the merchants' places are given back.
        assert!(start(1).await.unwrap().is_ok());
    }

    fn table(host: &'static str, ip: &'static str) -> TargetPolicy {
        TargetPolicy::default().with_resolver(Arc::new(move |h: &str, port| {
            if h == host {
                Ok(vec![SocketAddr::new(ip.parse().expect("ip"), port)])
            } else {
                Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no"))
            }
        }))
    }

    #[test]
    fn internal_addresses_in_every_spelling_are_refused() {
        let p = table("public.test", "93.184.216.34");
        for url in [
            "http://127.0.0.1/",
            "http://127.1.2.3:8080/x",
            "http://10.0.0.1/",
            "http://172.16.0.1/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            "http://[::1]/",
            "http://[::]/",
            "http://[fc00::1]/",
            "http://[fd12:3456::1]/",
            "http://[fe80::1]/",
            "http://[ff02::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:10.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::127.0.0.1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[64:ff9b:1::a00:1]/",
            "http://[64:ff9b:1:fffe::7f00:1]/",
            "http://[2002:7f00:1::]/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0x7f000001/",
            "http://017700000001/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "https://0/",
        ] {
            assert_eq!(
                check(url, &p).map(|t| t.addrs),
                Err(TargetError::Internal),
                "{url}"
            );
        }
    }

    #[test]
    fn a_name_that_resolves_inside_is_refused_and_public_ones_are_pinned() {
        let p = table("inside.test", "127.0.0.1");
        assert_eq!(
            check("https://inside.test/hook", &p).map(|t| t.addrs),
            Err(TargetError::Internal)
        );
        assert_eq!(
            check("https://elsewhere.test/hook", &p).map(|t| t.addrs),
            Err(TargetError::Unresolved)
        );
        let p = table("shop.test", "93.184.216.34");
        let t = check("https://shop.test./hook", &p).expect("public");
        assert_eq!(t.host.as_deref(), Some("shop.test."));
        assert_eq!(t.addrs, vec!["93.184.216.34:443".parse().expect("addr")]);
        let t = check("http://[2606:4700::1111]:8443/h", &p).expect("public v6");
        assert_eq!(t.host, None);
        assert_eq!(
            t.addrs,
            vec!["[2606:4700::1111]:8443".parse().expect("addr")]
        );
        for bad in [
            "ftp://shop.test/",
            "http://user:pw@shop.test/",
            "shop.test",
            "http://",
        ] {
            assert_eq!(
                check(bad, &p).map(|t| t.addrs),
                Err(TargetError::BadUrl),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_switch_allows_private_targets() {
        let mut p = table("inside.test", "10.1.2.3");
        p.allow_private = true;
        assert_eq!(
            check("http://inside.test:81/", &p).expect("allowed").addrs,
            vec!["10.1.2.3:81".parse().expect("addr")]
        );
        assert!(check("http://127.0.0.1:9/", &p).is_ok());
    }
}
