//! Where the load goes: parses gateway URLs (`ws://`, or `wss://` through a TLS-terminating load
//! balancer; loopback only unless `--allow-remote`) and the loopback source addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

use anyhow::{Context, bail};

/// One gateway WebSocket URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as given.
    pub url: String,
    /// Where to connect.
    pub addr: SocketAddr,
    /// `host:port` as written in the URL (for the Host header).
    pub authority: String,
    /// Path and query, starting with `/`.
    pub path_and_query: String,
    /// `wss://`: TLS, with the certificate checked against `host`.
    pub tls: bool,
    /// The host as written in the URL (without brackets), the name TLS checks.
    pub host: String,
}

impl Target {
    /// Parses `ws://host[:port][/path][?query]` or `wss://...` (port 443 by default). Without
    /// `allow_remote` only loopback hosts are accepted: an IPv4 address in 127.0.0.0/8, `[::1]`
    /// or `localhost`, every other host is refused (without a DNS lookup). With it, any host is
    /// resolved and its first address used.
    pub fn parse(url: &str, allow_remote: bool) -> anyhow::Result<Target> {
        let (rest, tls) = if let Some(rest) = url.strip_prefix("ws://") {
            (rest, false)
        } else if let Some(rest) = url.strip_prefix("wss://") {
            (rest, true)
        } else {
            bail!("{url}: a gateway URL must start with ws:// or wss://");
        };
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(split);
        let path_and_query = match tail.chars().next() {
            None => "/ws".to_string(),
            Some('?') => format!("/ws{tail}"),
            Some(_) => tail.to_string(),
        };
        if authority.contains('@') {
            bail!("{url}: user info in the URL is not supported");
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) =
            split_host_port(authority, default_port).with_context(|| format!("{url}: bad host"))?;
        let addr = if allow_remote {
            resolve(host, port).with_context(|| format!("{url}: cannot resolve {host:?}"))?
        } else {
            let ip = loopback_ip(host).with_context(|| {
                format!(
                    "{url}: refusing host {host:?}: the load tool only targets loopback addresses \
                     (127.0.0.0/8, localhost, [::1]) unless --allow-remote is given"
                )
            })?;
            SocketAddr::new(ip, port)
        };
        Ok(Target {
            url: url.to_string(),
            addr,
            authority: authority.to_string(),
            path_and_query,
            tls,
            host: host.to_string(),
        })
    }

    /// The URL to open for one client: the target's path and query plus `token` (and `format`
    /// when the encoding travels in the query).
    pub fn client_url(&self, token: &str, format: Option<&str>) -> String {
        let sep = if self.path_and_query.contains('?') {
            '&'
        } else {
            '?'
        };
        let scheme = if self.tls { "wss" } else { "ws" };
        let mut url = format!(
            "{scheme}://{}{}{sep}token={token}",
            self.authority, self.path_and_query
        );
        if let Some(format) = format {
            url.push_str("&format=");
            url.push_str(format);
        }
        url
    }
}

/// A host's first address (an IP address as is, a name through the system's resolver).
fn resolve(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    (host, port)
        .to_socket_addrs()?
        .next()
        .context("the name has no address")
}

fn split_host_port(authority: &str, default_port: u16) -> anyhow::Result<(&str, u16)> {
    if authority.is_empty() {
        bail!("empty host");
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let end = rest.find(']').context("unclosed [")?;
        let host = &rest[..end];
        let after = &rest[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => bail!("junk after ]"),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().context("bad port")?,
        None => default_port,
    };
    Ok((host, port))
}

/// The loopback address a host names; an error for anything that is not loopback. Host names
/// other than `localhost` are refused without a DNS lookup.
fn loopback_ip(host: &str) -> anyhow::Result<IpAddr> {
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let ip: IpAddr = host
        .parse()
        .context("not an IP address (only `localhost` is accepted as a name)")?;
    if !ip.is_loopback() {
        bail!("{ip} is not a loopback address");
    }
    Ok(ip)
}

/// Parses `--source-ips`: `127.0.0.1-127.0.0.20`, a count `20` (127.0.0.1 up to 127.0.0.20), or
/// a comma-separated list of those. Every address must be in 127.0.0.0/8.
pub fn parse_source_ips(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Ok(count) = part.parse::<u32>() {
            if count == 0 || count > 254 {
                bail!("--source-ips count must be 1 to 254, not {count}");
            }
            out.extend((1..=count).map(|n| IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | n))));
        } else if let Some((a, b)) = part.split_once('-') {
            let a = loopback_v4(a.trim())?;
            let b = loopback_v4(b.trim())?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a {
                bail!("--source-ips range {part} runs backwards");
            }
            if b - a >= 4096 {
                bail!("--source-ips range {part} has more than 4096 addresses");
            }
            out.extend((a..=b).map(|n| IpAddr::V4(Ipv4Addr::from(n))));
        } else {
            out.push(IpAddr::V4(loopback_v4(part)?));
        }
    }
    if out.is_empty() {
        bail!("--source-ips names no address");
    }
    Ok(out)
}

fn loopback_v4(text: &str) -> anyhow::Result<Ipv4Addr> {
    let ip: Ipv4Addr = text
        .parse()
        .with_context(|| format!("--source-ips: {text:?} is not an IPv4 address"))?;
    if !ip.is_loopback() {
        bail!("--source-ips: {ip} is not in 127.0.0.0/8");
    }
    Ok(ip)
}

/// The source address a client connecting to `target` binds to: one of `sources` for an IPv4
/// loopback target, `::1` for an IPv6 one, and for a remote target (`--allow-remote`) whichever
/// the system picks.
pub fn source_for(target: &Target, sources: &[IpAddr], index: usize) -> IpAddr {
    match target.addr {
        SocketAddr::V4(a) if !a.ip().is_loopback() => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(a) if !a.ip().is_loopback() => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        SocketAddr::V4(_) => sources
            .get(index % sources.len().max(1))
            .copied()
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_parse() -> anyhow::Result<()> {
        let t = Target::parse("ws://127.0.0.1:8080/ws", false)?;
        assert_eq!(t.addr, "127.0.0.1:8080".parse()?);
        assert_eq!(
            t.client_url("abc", None),
            "ws://127.0.0.1:8080/ws?token=abc"
        );
        let t = Target::parse("ws://localhost:9000", false)?;
        assert_eq!(t.path_and_query, "/ws");
        assert_eq!(
            t.client_url("t", Some("json")),
            "ws://localhost:9000/ws?token=t&format=json"
        );
        let t = Target::parse("ws://[::1]:7000/ws?x=1", false)?;
        assert_eq!(t.addr, "[::1]:7000".parse()?);
        assert_eq!(t.client_url("t", None), "ws://[::1]:7000/ws?x=1&token=t");
        assert_eq!(Target::parse("ws://127.1.2.3", false)?.addr.port(), 80);
        Ok(())
    }

    #[test]
    fn other_hosts_are_refused() {
        for url in [
            "ws://10.0.0.1:8080/ws",
            "ws://192.168.1.2/ws",
            "ws://example.com/ws",
            "ws://8.8.8.8:80",
            "ws://[2001:db8::1]:80/ws",
            "wss://10.0.0.1/ws",
            "http://127.0.0.1/ws",
            "ws://user@127.0.0.1/ws",
        ] {
            assert!(Target::parse(url, false).is_err(), "{url} was accepted");
        }
    }

    #[test]
    fn wss_urls_and_remote_hosts_when_allowed() -> anyhow::Result<()> {
        let t = Target::parse("wss://localhost/ws", false)?;
        assert!(t.tls);
        assert_eq!((t.addr.port(), t.host.as_str()), (443, "localhost"));
        assert_eq!(t.client_url("t", None), "wss://localhost/ws?token=t");
        let t = Target::parse("wss://[::1]:8443", false)?;
        assert_eq!((t.addr.port(), t.host.as_str()), (8443, "::1"));
        // Remote targets only when asked; parsed, never connected to here.
        assert!(Target::parse("ws://192.0.2.7:8080/ws", false).is_err());
        let t = Target::parse("ws://192.0.2.7:8080/ws", true)?;
        assert_eq!(t.addr, "192.0.2.7:8080".parse()?);
        let sources = parse_source_ips("127.0.0.2")?;
        assert_eq!(
            source_for(&t, &sources, 0),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            "not a loopback source"
        );
        let t = Target::parse("wss://[2001:db8::1]/ws", true)?;
        assert_eq!((t.addr.port(), t.tls), (443, true));
        Ok(())
    }

    #[test]
    fn source_ip_specs() -> anyhow::Result<()> {
        assert_eq!(parse_source_ips("127.0.0.1")?.len(), 1);
        let range = parse_source_ips("127.0.0.1-127.0.0.20")?;
        assert_eq!(range.len(), 20);
        assert_eq!(range[19], "127.0.0.20".parse::<IpAddr>()?);
        let count = parse_source_ips("3")?;
        assert_eq!(count[2], "127.0.0.3".parse::<IpAddr>()?);
        assert_eq!(parse_source_ips("127.0.0.2,127.0.0.5-127.0.0.6")?.len(), 3);
        assert!(parse_source_ips("10.0.0.1").is_err());
        assert!(parse_source_ips("127.0.0.9-127.0.0.1").is_err());
        assert!(parse_source_ips("0").is_err());
        assert!(parse_source_ips("").is_err());
        Ok(())
    }
}
