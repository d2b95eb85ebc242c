//! A pod's request, from the accepted socket to the answer: [`accept`] reads the kernel's
//! identity of the connection, [`identify`] turns it into a pod record, [`imds`] routes the
//! request (tokens, credentials, the proxied paths) under [`limits`].

pub mod accept;
pub mod identify;
pub mod imds;
pub mod limits;
pub mod proxy;
pub mod tokens;
