//! `CNI_ARGS` (`K=V;K=V`): parsing never panics, a bad entry is code 4 (invalid environment),
//! and a pod is found only with a namespace and a name.
#![no_main]

use iamlink_cni::error::Code;
use iamlink_cni::netconf::{parse_args, Env};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The runtime hands CNI_ARGS as an environment variable; std gives it to the plugin as UTF-8.
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let args = match parse_args(raw) {
        Ok(args) => args,
        Err(e) => {
            assert_eq!(e.code, Code::InvalidEnv);
            assert!(raw.split(';').any(|p| !p.is_empty() && !p.contains('=')), "refused a well-formed {raw:?}");
            return;
        }
    };
    // Every entry is kept, the last value of a key winning.
    let mut expected = std::collections::HashMap::new();
    for (k, v) in raw.split(';').filter_map(|p| p.split_once('=')) {
        expected.insert(k, v);
    }
    assert_eq!(expected.len(), args.len());
    for (k, v) in &args {
        assert_eq!(expected.get(k.as_str()), Some(&v.as_str()), "key {k:?}");
    }
    let env = Env { args, ..Default::default() };
    match env.pod() {
        Ok(pod) => {
            assert!(!pod.namespace.is_empty() && !pod.name.is_empty());
            assert_eq!(Some(&pod.namespace), env.args.get("K8S_POD_NAMESPACE"));
            assert_eq!(Some(&pod.name), env.args.get("K8S_POD_NAME"));
        }
        Err(e) => assert_eq!(e.code, Code::InvalidEnv),
    }
});
