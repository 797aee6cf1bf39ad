//! Which address a request came from: the TCP peer, or (only when the peer is one of the
//! trusted proxies) the address that proxy wrote into `X-Forwarded-For`. Clients can put
//! anything in that header, so it means nothing from anyone else.

use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::Response;
use std::net::{IpAddr, SocketAddr};

/// Networks whose `X-Forwarded-For` is believed (`TUNESHOP_TRUSTED_PROXIES`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// Parses a comma-separated list of addresses and CIDR networks (`10.0.0.0/8, ::1`).
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (addr, len) = item.split_once('/').unwrap_or((item, ""));
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| format!("`{item}` is not an IP address or CIDR network"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len = if len.is_empty() {
                max
            } else {
                len.parse::<u8>()
                    .ok()
                    .filter(|&l| l <= max)
                    .ok_or_else(|| format!("`{item}`: the prefix length must be 0 to {max}"))?
            };
            nets.push((ip, len));
        }
        Ok(Self(nets))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|&(net, len)| in_net(ip, net, len))
    }
}

fn in_net(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    let (a, b, bits) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        (IpAddr::V6(a), IpAddr::V4(_)) => match a.to_ipv4_mapped() {
            Some(v4) => return in_net(IpAddr::V4(v4), net, len),
            None => return false,
        },
        _ => return false,
    };
    let shift = bits - len as u32;
    shift >= bits || (a >> shift) == (b >> shift)
}

/// The client of a request from `peer` with `forwarded` (`X-Forwarded-For`): walking the
/// header from the right, past every trusted proxy, the first address that is not one.
pub fn client_ip(peer: IpAddr, forwarded: Option<&str>, trusted: &TrustedProxies) -> IpAddr {
    if !trusted.contains(peer) {
        return peer;
    }
    let mut client = peer;
    for hop in forwarded.unwrap_or("").rsplit(',').map(str::trim) {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !trusted.contains(ip) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

/// The client's address, for handlers and logs.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub IpAddr);

/// Records the client's address in the request's span and extensions.
pub async fn record(trusted: TrustedProxies, mut req: Request, next: Next) -> Response {
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>().copied() {
        let forwarded = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        let ip = client_ip(peer.ip(), forwarded, &trusted);
        tracing::Span::current().record("client_ip", tracing::field::display(ip));
        req.extensions_mut().insert(ClientIp(ip));
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_addresses_count_only_from_trusted_proxies() {
        let trusted = TrustedProxies::parse("172.30.0.10, 10.0.0.0/8").unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // From the proxy: the client it saw.
        assert_eq!(
            client_ip(ip("172.30.0.10"), Some("203.0.113.7"), &trusted),
            ip("203.0.113.7")
        );
        // A client's own header is ignored when it talks to us directly.
        assert_eq!(
            client_ip(ip("198.51.100.2"), Some("1.2.3.4"), &trusted),
            ip("198.51.100.2")
        );
        // Through two trusted hops, a spoofed first entry does not win.
        assert_eq!(
            client_ip(
                ip("10.1.2.3"),
                Some("6.6.6.6, 203.0.113.7, 10.9.9.9"),
                &trusted
            ),
            ip("203.0.113.7")
        );
        // IPv4-mapped peers and bad input.
        assert!(trusted.contains(ip("::ffff:172.30.0.10")));
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
        assert!(TrustedProxies::parse("proxy.local").is_err());
        assert_eq!(
            TrustedProxies::parse("").unwrap(),
            TrustedProxies::default()
        );
    }
}
