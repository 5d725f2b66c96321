//! SSRF guard for webhook URLs that name a host: every address the name resolves to must be public.

use std::net::IpAddr;

use domain::user::is_forbidden_address;

/// The host and port of an absolute http(s) URL (already checked by `WebhookUrl::parse`).
pub fn host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let default = if scheme.eq_ignore_ascii_case("https") { 443 } else { 80 };
    let authority = rest.split(['/', '?', '#']).next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok()).unwrap_or(default);
        return Some((host.to_owned(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !p.is_empty() => Some((h.to_owned(), p.parse().ok()?)),
        _ => Some((authority.to_owned(), default)),
    }
}

/// Resolves the URL's host; refuses it when it does not resolve or any address is not public.
pub async fn check_resolves_publicly(url: &str) -> Result<Vec<IpAddr>, String> {
    let (host, port) = host_port(url).ok_or("must have a host")?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return if is_forbidden_address(ip) { Err("must not point at a non-public address".into()) } else { Ok(vec![ip]) };
    }
    let addrs: Vec<IpAddr> = tokio::time::timeout(std::time::Duration::from_secs(3), tokio::net::lookup_host((host.as_str(), port)))
        .await
        .map_err(|_| format!("{host} could not be resolved in time"))?
        .map_err(|_| format!("{host} does not resolve"))?
        .map(|a| a.ip())
        .collect();
    if addrs.is_empty() {
        return Err(format!("{host} does not resolve"));
    }
    if addrs.iter().any(|ip| is_forbidden_address(*ip)) {
        return Err(format!("{host} resolves to a non-public address"));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_are_found() {
        assert_eq!(host_port("https://a.example/x"), Some(("a.example".into(), 443)));
        assert_eq!(host_port("http://a.example:8080/x?y"), Some(("a.example".into(), 8080)));
        assert_eq!(host_port("http://[::1]:9/x"), Some(("::1".into(), 9)));
    }

    #[tokio::test]
    async fn names_that_resolve_to_loopback_are_refused() {
        assert!(check_resolves_publicly("http://localhost:9/hook").await.is_err());
        assert!(check_resolves_publicly("http://127.0.0.1/hook").await.is_err());
    }
}
