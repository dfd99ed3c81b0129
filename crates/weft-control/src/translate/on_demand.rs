//! On-demand output for proxies that announce `WEFT_ON_DEMAND` (delta xDS): route
//! configurations carry `vhds` and only their catch-all (`*`) virtual host; every other
//! virtual host becomes a VHDS resource named `<route configuration>/<virtual host>`,
//! served when the proxy asks for a host it matches (Envoy's VHDS). Clusters and
//! endpoints stay in the output; the proxy subscribes to them by name.

use envoy_types::pb::envoy::config::core::v3::{
    config_source, AggregatedConfigSource, ApiVersion, ConfigSource as PbConfigSource,
};
use envoy_types::pb::envoy::config::route::v3::Vhds;
use weft_xds::vhds;

use super::ProxyXds;

/// Moves every virtual host but the catch-all out of the route configurations into
/// VHDS resources, and points the route configurations at VHDS over ADS.
pub fn split(out: &mut ProxyXds) {
    for rc in &mut out.routes {
        let (keep, on_demand): (Vec<_>, Vec<_>) =
            rc.virtual_hosts.drain(..).partition(|vh| vh.domains.iter().any(|d| d == "*"));
        rc.virtual_hosts = keep;
        rc.vhds = Some(Vhds { config_source: Some(ads()) });
        for mut vh in on_demand {
            vh.name = vhds::alias(&rc.name, &vh.name);
            out.virtual_hosts.push(vh);
        }
    }
    out.virtual_hosts.sort_by(|a, b| a.name.cmp(&b.name));
}

fn ads() -> PbConfigSource {
    PbConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}
