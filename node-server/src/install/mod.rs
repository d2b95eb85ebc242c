//! What iamlinkd puts on the node and keeps there: the plugin's entry in the node's CNI config
//! ([`cni_config`]) and the interception rule set and routing-policy rules ([`guard`]).

pub mod cni_config;
pub mod guard;
