//! Type URLs of the resources weft exchanges and how to name a packed resource.

use envoy_types::pb::google::protobuf::Any;
use prost::Message;

/// Listener (LDS).
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// RouteConfiguration (RDS).
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Cluster (CDS).
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// ClusterLoadAssignment (EDS).
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// VirtualHost (VHDS, delta only): named `<route configuration>/<virtual host>` and
/// subscribed by `<route configuration>/<host>` aliases.
pub const VIRTUAL_HOST: &str = "type.googleapis.com/envoy.config.route.v3.VirtualHost";
/// TLS Secret (SDS).
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Whether an empty SotW subscription for this type means "everything" (LDS, CDS).
pub fn is_wildcard_type(type_url: &str) -> bool {
    type_url == LISTENER || type_url == CLUSTER
}

/// Whether subscribed names of this type are aliases the server resolves to resources
/// of another name (VHDS: `<route configuration>/<host>` -> `<route configuration>/<vhost>`).
/// A name the server cannot resolve is answered with a body-less resource carrying the
/// name as alias, as Envoy's VHDS expects.
pub fn resolves_aliases(type_url: &str) -> bool {
    type_url == VIRTUAL_HOST
}

/// Short name of a type URL for messages and logs (`Listener`, `Cluster`, ...).
pub fn short(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}

/// Field 1 of every resource type weft names: `name` of a Listener, RouteConfiguration,
/// Cluster, VirtualHost and Secret, `cluster_name` of a ClusterLoadAssignment.
/// Decoding only it reads the message's top-level fields (their wire format is checked)
/// and steps over every other one by its length, without building nested messages:
/// naming a resource no longer costs a second full decode on top of the one that
/// applies it (which still checks the rest and NACKs what does not decode).
#[derive(Clone, PartialEq, Message)]
struct NameField {
    #[prost(string, tag = "1")]
    name: String,
}

/// The name of a packed resource of `type_url` (for a ClusterLoadAssignment its
/// `cluster_name`). Errors name the type and say what is wrong.
pub fn resource_name(type_url: &str, any: &Any) -> Result<String, String> {
    if any.type_url != type_url {
        return Err(format!("resource of type {} found where {} was expected", any.type_url, type_url));
    }
    if ![LISTENER, ROUTE, CLUSTER, ENDPOINT, SECRET, VIRTUAL_HOST].contains(&type_url) {
        return Err(format!("unknown resource type {type_url}"));
    }
    match NameField::decode(any.value.as_slice()) {
        Ok(NameField { name }) if name.is_empty() => Err(format!("{} without a name", short(type_url))),
        Ok(NameField { name }) => Ok(name),
        Err(e) => Err(format!("cannot decode {}: {e}", short(type_url))),
    }
}
