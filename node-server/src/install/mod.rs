//! What iamlinkd puts on the node and keeps there: the plugin's entry in the node's CNI config
//! ([`cni_config`]), the interception rule set and routing-policy rules ([`guard`]), beside the EKS
//! Pod Identity agent when it runs ([`pod_identity`]), the records of pods that ran before iamlink
//! was chained ([`adopt`]), what it takes off the node: its startup taint ([`startup_taint`]), and
//! all of it when its DaemonSet is removed ([`owner`]).

pub mod adopt;
pub mod cni_config;
pub mod guard;
pub mod owner;
pub mod pod_identity;
pub mod startup_taint;
pub mod tcx_keeper;

use tracing::{info, warn};

use iamlink_common::intercept::{Repair, RuleSet};
use iamlink_common::netlink::Netlink;
use iamlink_common::store::StoreLock;
use iamlink_common::{intercept, Store};

use crate::config::Config;
use crate::error::Error;

/// `iamlinkd install-cni`. The binary first: an entry without its binary would fail every
/// pod's ADD. With `wait`, a conf dir without the primary CNI's config is waited on, not an error.
/// The plugin's `credentialsAddress` leaves 169.254.170.23 to an EKS Pod Identity agent found on
/// the node now (see [`pod_identity`]).
pub async fn install_cni(config: &Config, wait: bool) -> Result<(), Error> {
    let installer = cni_config::Installer::new(config, pod_identity::detect_here().await)?;
    let binary = installer.installed_binary();
    match installer.install_binary()? {
        true => info!(path = %binary.display(), "installed the iamlink plugin"),
        false => info!(path = %binary.display(), "iamlink plugin already up to date"),
    }
    if wait {
        cni_config::wait_for_config(&installer.conf_dir).await?;
    }
    match installer.chain()? {
        Some(file) => info!(file = %file.display(), "chained iamlink into the CNI config"),
        None => info!(dir = %installer.conf_dir.display(), "iamlink already chained"),
    }
    Ok(())
}

/// `iamlinkd install-table`: the interception rule set and routing-policy rules for the store's
/// records, exactly as iamlinkd installs them at its start ([`ensure_table`],
/// [`ensure_policy_rules`]), then exit. The DaemonSet's first init container runs it, so that from
/// then on a pod without a record (one whose network came through the primary CNI alone, before
/// install-cni chained iamlink) is refused, never forwarded to the node's metadata service.
pub async fn install_table(config: &Config) -> Result<(), Error> {
    let store = Store::open(&config.store_dir)?;
    let rules = pod_identity::rule_set_here(config).await;
    let (records, repairs) = ensure_table(&rules, &store, &store.lock()?)?;
    if repairs.is_empty() {
        info!(records, table = intercept::TABLE, "interception rule set already in place: not touched");
    }
    ensure_policy_rules(&rules).await?;
    Ok(())
}

/// Makes the interception table what the config and the store's records say, under the store
/// lock (`guard::ensure`: a missing table or one of another layout is rebuilt whole, conntrack
/// entries of the metadata addresses are then deleted; a table already right is not touched).
/// Returns the number of records and the repairs made.
pub fn ensure_table(rules: &RuleSet, store: &Store, lock: &StoreLock) -> Result<(usize, Vec<Repair>), Error> {
    let (records, bad) = store.slot_holders()?;
    for e in bad {
        warn!(error = %e, "skipping unreadable pod record");
    }
    let repairs = guard::ensure(rules, lock, &records)?;
    Ok((records.len(), repairs))
}

/// The routing-policy rules that refuse forwarded traffic to a metadata address when the table
/// is gone; added where missing, and removed for an address the rule set leaves alone (the EKS
/// Pod Identity agent's).
pub async fn ensure_policy_rules(rules: &RuleSet) -> Result<(), Error> {
    let node = Netlink::here()?;
    node.remove_policy_rules_except(&rules.addresses).await?;
    for rule in node.ensure_policy_rules(&rules.addresses).await? {
        info!(rule = %rule, "added routing-policy rule");
    }
    Ok(())
}

/// `iamlinkd uninstall-cni`, in the reverse order of install: no new pod may meet an entry whose
/// binary is gone. The rule set goes last, under the store lock; routes and the primary plugin's
/// rules stay.
pub async fn uninstall_cni(config: &Config) -> Result<(), Error> {
    let installer = cni_config::Installer::new(config, false)?;
    for file in installer.uninstall()? {
        info!(file = %file.display(), "removed iamlink from the CNI config");
    }
    info!(path = %installer.installed_binary().display(), "removed the iamlink plugin");
    let store = Store::open(&config.store_dir)?;
    let lock = store.lock()?;
    intercept::remove_all(&lock)?;
    info!(table = intercept::TABLE, "removed the interception rule set");
    Netlink::here()?.remove_policy_rules().await?;
    info!("removed the routing-policy rules");
    Ok(())
}
