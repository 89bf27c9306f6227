#![no_std]
// This file exists to enable the library target, so that the agent can name
// this crate as a build-dependency (aya-template does the same).
