//! What iamlinkd puts on the node and keeps there: the plugin's entry in the node's CNI config
//! ([`cni_config`]) and the interception rule set and routing-policy rules ([`guard`]), and
//! takes them off when its DaemonSet is removed ([`owner`]).

pub mod cni_config;
pub mod guard;
pub mod owner;

use tracing::info;

use iamlink_common::netlink::Netlink;
use iamlink_common::{intercept, Store};

use crate::config::Config;
use crate::error::Error;

/// `iamlinkd install-cni`. The binary first: an entry without its binary would fail every
/// pod's ADD.
pub fn install_cni(config: &Config) -> Result<(), Error> {
    let installer = cni_config::Installer::new(config)?;
    let binary = installer.installed_binary();
    match installer.install_binary()? {
        true => info!(path = %binary.display(), "installed the iamlink plugin"),
        false => info!(path = %binary.display(), "iamlink plugin already up to date"),
    }
    match installer.chain()? {
        Some(file) => info!(file = %file.display(), "chained iamlink into the CNI config"),
        None => info!(dir = %installer.conf_dir.display(), "iamlink already chained"),
    }
    Ok(())
}

/// `iamlinkd uninstall-cni`, in the reverse order of install: no new pod may meet an entry whose
/// binary is gone. The rule set goes last, under the store lock; routes and the primary plugin's
/// rules stay.
pub async fn uninstall_cni(config: &Config) -> Result<(), Error> {
    let installer = cni_config::Installer::new(config)?;
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
