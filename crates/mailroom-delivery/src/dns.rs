//! Where a domain's mail goes (RFC 5321 §5.1): its MX hosts in the order to
//! try them, each with its IPv4 and IPv6 addresses.
//!
//! [`MxResolver::resolve`] asks for the domain's MX records, falls back to
//! the implicit MX (the domain's own A/AAAA records) when there are none,
//! and recognises the null MX of RFC 7505. Answers, negative answers
//! included, are kept in our own cache for the records' TTL clamped to the
//! configured bounds; hickory's cache is switched off so that one cache, with
//! one policy, decides how long an answer lives. Concurrent lookups of the
//! same domain share one query.
//!
//! What this module does not do: domain literals (`[192.0.2.1]`) are the
//! caller's business, and it does not know the local host's own names, so
//! dropping MX records that point back at us (RFC 5321 §5.1) is left to the
//! caller too. TLSA/MTA-STS policy lookups live elsewhere.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::rdata::SOA;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{ResolveError, ResolveErrorKind, TokioResolver};
use mailroom_core::config::DnsConfig;
use rand::seq::SliceRandom;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The system resolver configuration read when no nameservers are configured.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Most entries the answer cache holds; past that, expired entries go first,
/// then arbitrary ones.
const CACHE_CAPACITY: usize = 10_000;

/// How long a temporary failure is remembered (never longer than `min_ttl`):
/// long enough that a burst of mail to a broken domain makes one query, short
/// enough that the next retry asks again.
const TEMPORARY_TTL: Duration = Duration::from_secs(5);

/// Most MX hosts whose addresses are looked up, in preference order. A
/// domain with more is either misconfigured or hostile; nobody tries the
/// seventeenth host of a delivery anyway.
const MAX_MX_HOSTS: usize = 16;

/// One place to send a domain's mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    /// Host name, lowercase ASCII (IDNs as punycode), without a trailing dot.
    pub name: String,
    /// MX preference; lower is tried first. The implicit MX has 0.
    pub preference: u16,
    /// IPv4 addresses first, then IPv6, each in the order the DNS gave them.
    /// Never empty.
    pub addrs: Vec<IpAddr>,
}

/// Why a domain's mail hosts could not be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// RFC 7505 null MX (`MX 0 .`): the domain accepts no mail. Permanent.
    #[error("{domain} accepts no mail (null MX, RFC 7505)")]
    NullMx { domain: String },
    /// NXDOMAIN (or a name that cannot exist in the DNS). Permanent.
    #[error("domain {domain} does not exist")]
    NoSuchDomain { domain: String },
    /// The domain exists but has no MX, A or AAAA records. Permanent.
    #[error("{domain} has no MX, A or AAAA records")]
    NoMailHosts { domain: String },
    /// SERVFAIL, REFUSED, a timeout, a network error, or MX hosts none of
    /// which has an address: try again later.
    #[error("DNS lookup for {domain} failed temporarily: {reason}")]
    Temporary { domain: String, reason: String },
}

impl DnsError {
    /// Whether retrying cannot help (the message should bounce).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, DnsError::Temporary { .. })
    }

    /// The domain the lookup was for (lowercase, without a trailing dot).
    pub fn domain(&self) -> &str {
        match self {
            DnsError::NullMx { domain }
            | DnsError::NoSuchDomain { domain }
            | DnsError::NoMailHosts { domain }
            | DnsError::Temporary { domain, .. } => domain,
        }
    }
}

/// Why an [`MxResolver`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DnsSetupError {
    /// `dns.nameservers` is empty and the system configuration is unreadable.
    #[error("dns.nameservers is empty and {path} cannot be read: {source}")]
    ReadSystemConf {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// `dns.nameservers` is empty and the system configuration names none.
    #[error("dns.nameservers is empty and {path} lists no usable nameserver")]
    NoSystemNameservers { path: String },
}

type Answer = Result<Vec<MxHost>, DnsError>;

/// Finds MX hosts, with a TTL-respecting cache. Cheap to clone: clones
/// share the resolver, the cache and the in-flight lookups.
#[derive(Clone)]
pub struct MxResolver {
    inner: Arc<Inner>,
}

struct Inner {
    resolver: TokioResolver,
    min_ttl: Duration,
    max_ttl: Duration,
    cache: Mutex<AnswerCache>,
    /// Lookups under way, by cache key; later askers wait on the same answer.
    in_flight: Mutex<HashMap<String, watch::Receiver<Option<Answer>>>>,
}

impl fmt::Debug for MxResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MxResolver")
            .field("nameservers", &self.inner.resolver.config().name_servers())
            .field("min_ttl", &self.inner.min_ttl)
            .field("max_ttl", &self.inner.max_ttl)
            .finish_non_exhaustive()
    }
}

impl MxResolver {
    /// A resolver asking `config.nameservers` over UDP (TCP for truncated
    /// answers), or the nameservers of `/etc/resolv.conf` when that list is
    /// empty. Names are always asked as fully qualified: no search domains.
    pub fn new(config: &DnsConfig) -> Result<Self, DnsSetupError> {
        let nameservers = if config.nameservers.is_empty() {
            system_nameservers(Path::new(RESOLV_CONF))?
        } else {
            config.nameservers.clone()
        };
        let mut servers = Vec::with_capacity(nameservers.len() * 2);
        for addr in nameservers {
            servers.push(NameServerConfig::new(addr, Protocol::Udp));
            servers.push(NameServerConfig::new(addr, Protocol::Tcp));
        }
        let resolver_config = ResolverConfig::from_parts(None, Vec::new(), servers);

        let mut opts = ResolverOpts::default();
        opts.timeout = config.timeout;
        // hickory counts retries after the first try: 1 means two tries,
        // what `attempts:2` means in resolv.conf.
        opts.attempts = 1;
        opts.ndots = 0;
        opts.edns0 = true;
        opts.use_hosts_file = ResolveHosts::Never;
        // Our cache decides how long answers live; hickory's keeps nothing.
        opts.cache_size = 0;
        opts.positive_max_ttl = Some(Duration::ZERO);
        opts.negative_max_ttl = Some(Duration::ZERO);

        let resolver =
            TokioResolver::builder_with_config(resolver_config, TokioConnectionProvider::default())
                .with_options(opts)
                .build();

        Ok(MxResolver {
            inner: Arc::new(Inner {
                resolver,
                min_ttl: config.min_ttl,
                max_ttl: config.max_ttl.max(config.min_ttl),
                cache: Mutex::new(AnswerCache::new(CACHE_CAPACITY)),
                in_flight: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// MX hosts in the order to try: by preference, shuffled among equal
    /// preferences (afresh on every call, cached or not), each with its A
    /// and AAAA addresses. Hosts whose addresses cannot be found are
    /// skipped; if none has any, the result is [`DnsError::Temporary`].
    /// No MX records: the implicit MX, the domain itself with preference 0.
    /// A null MX (`0 .`): [`DnsError::NullMx`].
    ///
    /// Answers come from the cache while fresh; concurrent calls for the
    /// same domain share one lookup. Each query is tried twice, each try
    /// waiting up to `dns.timeout`, and a lookup is two rounds (MX, then the
    /// hosts' addresses in parallel): with a dead DNS the answer is
    /// [`DnsError::Temporary`] after at most about four timeouts.
    pub async fn resolve(&self, domain: &str) -> Result<Vec<MxHost>, DnsError> {
        let key = cache_key(domain);
        let answer = match self.inner.cached(&key) {
            Some(answer) => answer,
            None => self.shared_lookup(key).await,
        };
        answer.map(shuffle_equal_preferences)
    }

    /// Like [`resolve`](Self::resolve) but always asks the DNS, and neither
    /// reads nor fills the cache: for diagnostics and tests.
    pub async fn resolve_uncached(&self, domain: &str) -> Result<Vec<MxHost>, DnsError> {
        let key = cache_key(domain);
        let (answer, _ttl) = self.inner.lookup(&key).await;
        answer.map(shuffle_equal_preferences)
    }

    /// Joins the lookup under way for `key`, or starts one. The lookup runs
    /// in its own task so that a caller giving up does not cancel it for the
    /// others, and its answer always reaches the cache.
    async fn shared_lookup(&self, key: String) -> Answer {
        let mut rx = {
            let mut in_flight = lock(&self.inner.in_flight);
            // The lookup may have finished between the cache check and here.
            if let Some(answer) = self.inner.cached(&key) {
                return answer;
            }
            match in_flight.get(&key) {
                // A closed channel is a lookup whose task died (runtime shut
                // down): start over rather than wait on it.
                Some(rx) if rx.has_changed().is_ok() => rx.clone(),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    in_flight.insert(key.clone(), rx.clone());
                    let inner = Arc::clone(&self.inner);
                    let key = key.clone();
                    tokio::spawn(async move {
                        let (answer, ttl) = inner.lookup(&key).await;
                        lock(&inner.cache).insert(key.clone(), answer.clone(), ttl);
                        lock(&inner.in_flight).remove(&key);
                        // Nobody waiting is fine: the answer is in the cache.
                        let _ = tx.send(Some(answer));
                    });
                    rx
                }
            }
        };
        let answer = match rx.wait_for(Option::is_some).await {
            Ok(answer) => answer.clone(),
            Err(_) => None,
        };
        answer.unwrap_or_else(|| Err(aborted(key)))
    }
}

fn aborted(domain: String) -> DnsError {
    DnsError::Temporary {
        domain,
        reason: "the lookup was abandoned".into(),
    }
}

impl Inner {
    fn cached(&self, key: &str) -> Option<Answer> {
        lock(&self.cache).get(key, Instant::now())
    }

    /// The whole RFC 5321 §5.1 procedure for one domain, uncached, with how
    /// long its answer may be kept.
    async fn lookup(&self, domain: &str) -> (Answer, Duration) {
        let outcome = self.lookup_outcome(domain).await;
        let ttl = match &outcome.answer {
            Err(DnsError::Temporary { .. }) => TEMPORARY_TTL.min(self.min_ttl),
            _ if outcome.degraded => self.min_ttl,
            _ => outcome
                .ttl
                .map_or(self.min_ttl, |secs| Duration::from_secs(u64::from(secs)))
                .clamp(self.min_ttl, self.max_ttl),
        };
        match &outcome.answer {
            Ok(hosts) => tracing::debug!(domain, hosts = hosts.len(), ?ttl, "MX lookup"),
            Err(error) => tracing::debug!(domain, %error, ?ttl, "MX lookup failed"),
        }
        (outcome.answer, ttl)
    }

    async fn lookup_outcome(&self, domain: &str) -> Outcome {
        let Some(name) = fqdn(domain) else {
            return Outcome::new(Err(DnsError::NoSuchDomain {
                domain: domain.into(),
            }));
        };
        match self.resolver.lookup(name.clone(), RecordType::MX).await {
            Ok(lookup) => {
                let mut ttl = Ttl::default();
                let mut mxs = Vec::new();
                for record in lookup.records() {
                    ttl.add(record.ttl());
                    if let RData::MX(mx) = record.data() {
                        mxs.push((mx.preference(), mx.exchange().clone()));
                    }
                }
                if mxs.is_empty() {
                    // Only a CNAME chain came back: there is no MX.
                    return self.implicit_mx(domain, name, ttl).await;
                }
                self.mx_hosts(domain, mxs, ttl).await
            }
            Err(error) => match classify(&error) {
                Failure::NxDomain { negative_ttl } => Outcome {
                    answer: Err(DnsError::NoSuchDomain {
                        domain: domain.into(),
                    }),
                    ttl: negative_ttl,
                    degraded: false,
                },
                Failure::NoData { negative_ttl } => {
                    let mut ttl = Ttl::default();
                    ttl.add_opt(negative_ttl);
                    self.implicit_mx(domain, name, ttl).await
                }
                Failure::Temporary(reason) => Outcome::new(Err(DnsError::Temporary {
                    domain: domain.into(),
                    reason: format!("MX lookup: {reason}"),
                })),
            },
        }
    }

    /// No MX records: the domain itself is the mail host (RFC 5321 §5.1).
    async fn implicit_mx(&self, domain: &str, name: Name, mut ttl: Ttl) -> Outcome {
        let mut answer = Outcome::new(Ok(Vec::new()));
        match addresses(&self.resolver, name).await {
            HostAddrs::Found {
                addrs,
                ttl: addr_ttl,
                degraded,
            } => {
                ttl.add_opt(addr_ttl);
                answer.degraded = degraded;
                answer.answer = Ok(vec![MxHost {
                    name: domain.into(),
                    preference: 0,
                    addrs,
                }]);
            }
            HostAddrs::Missing {
                nxdomain,
                negative_ttl,
            } => {
                ttl.add_opt(negative_ttl);
                let domain = domain.into();
                answer.answer = Err(if nxdomain {
                    DnsError::NoSuchDomain { domain }
                } else {
                    DnsError::NoMailHosts { domain }
                });
            }
            HostAddrs::Temporary(reason) => {
                answer.answer = Err(DnsError::Temporary {
                    domain: domain.into(),
                    reason: format!("no MX records, and the address lookup failed: {reason}"),
                });
            }
        }
        answer.ttl = ttl.0;
        answer
    }

    /// MX records found: order them and look up each host's addresses.
    async fn mx_hosts(&self, domain: &str, mut mxs: Vec<(u16, Name)>, mut ttl: Ttl) -> Outcome {
        let mut answer = Outcome::new(Ok(Vec::new()));
        // RFC 7505: a null MX means no mail. A null MX next to real ones is
        // a misconfiguration; the real ones are still worth trying.
        mxs.retain(|(_, exchange)| !exchange.is_root());
        if mxs.is_empty() {
            answer.answer = Err(DnsError::NullMx {
                domain: domain.into(),
            });
            answer.ttl = ttl.0;
            return answer;
        }
        mxs.sort_by_key(|(preference, _)| *preference);
        let mut hosts: Vec<(u16, String, Name)> = Vec::with_capacity(mxs.len());
        for (preference, exchange) in mxs {
            let host = host_name(&exchange);
            // The same host twice: keep its most preferred record.
            if !hosts.iter().any(|(_, name, _)| *name == host) {
                hosts.push((preference, host, exchange));
            }
        }
        hosts.truncate(MAX_MX_HOSTS);

        let mut lookups = JoinSet::new();
        for (index, (_, _, exchange)) in hosts.iter().enumerate() {
            let resolver = self.resolver.clone();
            let mut exchange = exchange.clone();
            exchange.set_fqdn(true);
            lookups.spawn(async move { (index, addresses(&resolver, exchange).await) });
        }
        let mut found: Vec<Option<HostAddrs>> = hosts.iter().map(|_| None).collect();
        while let Some(joined) = lookups.join_next().await {
            match joined {
                Ok((index, addrs)) => {
                    if let Some(slot) = found.get_mut(index) {
                        *slot = Some(addrs);
                    }
                }
                Err(error) => tracing::warn!(domain, %error, "MX host address lookup task failed"),
            }
        }

        let mut result = Vec::with_capacity(hosts.len());
        let mut failures = Vec::new();
        for ((preference, name, _), addrs) in hosts.into_iter().zip(found) {
            match addrs {
                Some(HostAddrs::Found {
                    addrs,
                    ttl: addr_ttl,
                    degraded,
                }) => {
                    ttl.add_opt(addr_ttl);
                    answer.degraded |= degraded;
                    result.push(MxHost {
                        name,
                        preference,
                        addrs,
                    });
                }
                Some(HostAddrs::Missing {
                    nxdomain,
                    negative_ttl,
                }) => {
                    // It may gain an address; don't keep the answer longer.
                    ttl.add_opt(negative_ttl);
                    let why = if nxdomain {
                        "does not exist"
                    } else {
                        "has no address"
                    };
                    failures.push(format!("{name} {why}"));
                }
                Some(HostAddrs::Temporary(reason)) => {
                    answer.degraded = true;
                    failures.push(format!("{name}: {reason}"));
                }
                None => {
                    answer.degraded = true;
                    failures.push(format!("{name}: lookup failed"));
                }
            }
        }
        if result.is_empty() {
            answer.answer = Err(DnsError::Temporary {
                domain: domain.into(),
                reason: format!("no MX host has an address ({})", failures.join("; ")),
            });
        } else {
            if !failures.is_empty() {
                tracing::debug!(domain, skipped = %failures.join("; "), "MX hosts skipped");
            }
            answer.answer = Ok(result);
        }
        answer.ttl = ttl.0;
        answer
    }
}

/// One lookup's answer, the smallest TTL it rests on, and whether it is
/// partial (some part failed temporarily, so it should not be kept long).
struct Outcome {
    answer: Answer,
    ttl: Option<u32>,
    degraded: bool,
}

impl Outcome {
    fn new(answer: Answer) -> Self {
        Outcome {
            answer,
            ttl: None,
            degraded: false,
        }
    }
}

/// The smallest TTL seen so far.
#[derive(Default, Clone, Copy)]
struct Ttl(Option<u32>);

impl Ttl {
    fn add(&mut self, ttl: u32) {
        self.0 = Some(self.0.map_or(ttl, |seen| seen.min(ttl)));
    }

    fn add_opt(&mut self, ttl: Option<u32>) {
        if let Some(ttl) = ttl {
            self.add(ttl);
        }
    }
}

/// What the DNS said about one host's addresses.
enum HostAddrs {
    Found {
        addrs: Vec<IpAddr>,
        ttl: Option<u32>,
        /// One address family failed temporarily.
        degraded: bool,
    },
    /// NXDOMAIN (`nxdomain`) or no A and no AAAA records.
    Missing {
        nxdomain: bool,
        negative_ttl: Option<u32>,
    },
    Temporary(String),
}

/// A and AAAA for `name`, asked at the same time.
async fn addresses(resolver: &TokioResolver, name: Name) -> HostAddrs {
    let (v4, v6) = tokio::join!(
        resolver.lookup(name.clone(), RecordType::A),
        resolver.lookup(name, RecordType::AAAA),
    );
    let mut addrs = Vec::new();
    let mut ttl = Ttl::default();
    let mut negative = Ttl::default();
    let mut nxdomain = false;
    let mut temporary = Vec::new();
    for result in [v4, v6] {
        match result {
            Ok(lookup) => {
                for record in lookup.records() {
                    let addr = match record.data() {
                        RData::A(a) => IpAddr::V4(a.0),
                        RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
                        // CNAMEs on the way count for the TTL.
                        _ => {
                            ttl.add(record.ttl());
                            continue;
                        }
                    };
                    ttl.add(record.ttl());
                    if !addrs.contains(&addr) {
                        addrs.push(addr);
                    }
                }
            }
            Err(error) => match classify(&error) {
                Failure::NxDomain { negative_ttl } => {
                    nxdomain = true;
                    negative.add_opt(negative_ttl);
                }
                Failure::NoData { negative_ttl } => negative.add_opt(negative_ttl),
                Failure::Temporary(reason) => {
                    if !temporary.contains(&reason) {
                        temporary.push(reason);
                    }
                }
            },
        }
    }
    if !addrs.is_empty() {
        // A family with no records may gain some: its negative TTL counts.
        ttl.add_opt(negative.0);
        HostAddrs::Found {
            addrs,
            ttl: ttl.0,
            degraded: !temporary.is_empty(),
        }
    } else if !temporary.is_empty() {
        HostAddrs::Temporary(temporary.join("; "))
    } else {
        HostAddrs::Missing {
            nxdomain,
            negative_ttl: negative.0,
        }
    }
}

/// How a failed hickory lookup counts for mail.
enum Failure {
    NxDomain { negative_ttl: Option<u32> },
    NoData { negative_ttl: Option<u32> },
    Temporary(String),
}

fn classify(error: &ResolveError) -> Failure {
    let ResolveErrorKind::Proto(proto) = error.kind() else {
        return Failure::Temporary(error.to_string());
    };
    match proto.kind() {
        // hickory reports SERVFAIL, REFUSED and friends as "no records"
        // too; only the response code tells them apart.
        ProtoErrorKind::NoRecordsFound {
            response_code, soa, ..
        } => {
            let negative_ttl = soa.as_deref().map(negative_ttl);
            match *response_code {
                ResponseCode::NXDomain => Failure::NxDomain { negative_ttl },
                ResponseCode::NoError => Failure::NoData { negative_ttl },
                code => Failure::Temporary(format!("the server answered {code}")),
            }
        }
        _ => Failure::Temporary(proto.to_string()),
    }
}

/// RFC 2308 §5: a negative answer lives for the smaller of the SOA record's
/// TTL and its MINIMUM field.
fn negative_ttl(soa: &Record<SOA>) -> u32 {
    soa.ttl().min(soa.data().minimum())
}

/// The cache key and error domain: lowercase, without the trailing dot.
fn cache_key(domain: &str) -> String {
    let domain = domain.trim();
    domain.strip_suffix('.').unwrap_or(domain).to_lowercase()
}

/// `domain` as an absolute DNS name (IDNs converted to punycode), or `None`
/// for something that cannot be a domain name.
fn fqdn(domain: &str) -> Option<Name> {
    if domain.is_empty() {
        return None;
    }
    let mut name = Name::from_utf8(domain).ok()?;
    name.set_fqdn(true);
    Some(name)
}

fn host_name(name: &Name) -> String {
    let ascii = name.to_lowercase().to_ascii();
    match ascii.strip_suffix('.') {
        Some(trimmed) => trimmed.to_owned(),
        None => ascii,
    }
}

/// RFC 5321 §5.1: hosts of equal preference are tried in random order, to
/// spread the load. `hosts` is sorted by preference.
fn shuffle_equal_preferences(mut hosts: Vec<MxHost>) -> Vec<MxHost> {
    let mut rng = rand::thread_rng();
    for group in hosts.chunk_by_mut(|a, b| a.preference == b.preference) {
        group.shuffle(&mut rng);
    }
    hosts
}

/// The nameservers of a resolv.conf file (port 53). hickory's own reader
/// needs its `system-config` feature; the `nameserver` lines are all we use
/// (search domains are deliberately ignored: mail domains are absolute).
fn system_nameservers(path: &Path) -> Result<Vec<SocketAddr>, DnsSetupError> {
    let text = std::fs::read_to_string(path).map_err(|source| DnsSetupError::ReadSystemConf {
        path: path.display().to_string(),
        source,
    })?;
    let servers = parse_resolv_conf(&text);
    if servers.is_empty() {
        return Err(DnsSetupError::NoSystemNameservers {
            path: path.display().to_string(),
        });
    }
    Ok(servers)
}

fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "nameserver" {
                return None;
            }
            // Scoped IPv6 addresses (fe80::1%eth0) don't parse and are skipped.
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent even if a holder panicked.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Answers by domain, each until its expiry, at most `capacity` of them.
struct AnswerCache {
    entries: HashMap<String, CacheEntry>,
    capacity: usize,
}

struct CacheEntry {
    answer: Answer,
    expires: Instant,
}

impl AnswerCache {
    fn new(capacity: usize) -> Self {
        AnswerCache {
            entries: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    fn get(&self, key: &str, now: Instant) -> Option<Answer> {
        self.entries
            .get(key)
            .filter(|entry| entry.expires > now)
            .map(|entry| entry.answer.clone())
    }

    fn insert(&mut self, key: String, answer: Answer, ttl: Duration) {
        let now = Instant::now();
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries.retain(|_, entry| entry.expires > now);
            if self.entries.len() >= self.capacity {
                // Still full of live answers: drop a tenth, arbitrarily, so
                // the next inserts don't each scan the whole map again.
                let excess = self.entries.len() + 1 - self.capacity;
                let victims: Vec<String> = self
                    .entries
                    .keys()
                    .take(excess.max(self.capacity / 10))
                    .cloned()
                    .collect();
                for victim in victims {
                    self.entries.remove(&victim);
                }
            }
        }
        self.entries.insert(
            key,
            CacheEntry {
                answer,
                expires: now + ttl,
            },
        );
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, preference: u16) -> MxHost {
        MxHost {
            name: name.into(),
            preference,
            addrs: vec![IpAddr::from([192, 0, 2, 1])],
        }
    }

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# comment\nsearch example.test\nnameserver 10.0.0.1\n\
                    nameserver 2001:db8::1\nnameserver fe80::1%eth0\noptions ndots:2\n";
        let expected: Vec<SocketAddr> = vec![
            "10.0.0.1:53".parse().expect("literal"),
            "[2001:db8::1]:53".parse().expect("literal"),
        ];
        assert_eq!(parse_resolv_conf(text), expected);
    }

    #[test]
    fn unreadable_resolv_conf_is_a_clear_error() {
        let error =
            system_nameservers(Path::new("/nonexistent/resolv.conf")).expect_err("no such file");
        assert!(
            error.to_string().contains("/nonexistent/resolv.conf"),
            "{error}"
        );
    }

    #[test]
    fn cache_keys_ignore_case_and_the_trailing_dot() {
        assert_eq!(cache_key("Example.TEST."), "example.test");
        assert_eq!(cache_key("example.test"), "example.test");
    }

    #[test]
    fn shuffle_keeps_preference_order() {
        let hosts = vec![host("a", 5), host("b", 10), host("c", 10), host("d", 20)];
        for _ in 0..50 {
            let shuffled = shuffle_equal_preferences(hosts.clone());
            let preferences: Vec<u16> = shuffled.iter().map(|h| h.preference).collect();
            assert_eq!(preferences, [5, 10, 10, 20]);
            assert_eq!(shuffled[0].name, "a");
            assert_eq!(shuffled[3].name, "d");
        }
    }

    #[test]
    fn cache_expires_and_stays_bounded() {
        let mut cache = AnswerCache::new(20);
        cache.insert("gone".into(), Ok(vec![]), Duration::ZERO);
        assert!(cache.get("gone", Instant::now()).is_none());
        cache.insert(
            "kept".into(),
            Ok(vec![host("a", 0)]),
            Duration::from_secs(60),
        );
        assert!(cache.get("kept", Instant::now()).is_some());
        for i in 0..100 {
            cache.insert(format!("d{i}"), Ok(vec![]), Duration::from_secs(60));
            assert!(cache.len() <= 20);
        }
        assert!(cache.get("d99", Instant::now()).is_some());
    }
}
