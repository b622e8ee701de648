// Package protocol defines kpnode's wire formats and the validation every
// node applies to them, as pure functions with no I/O: KeyPackage bundles and
// account bundles (the chat-store payload layouts), the bundle ref, and the
// validation policy that decides what a node stores, serves and relays.
//
// The written specification is protocol/README.md. Strict Ed25519
// verification lives in protocol/ed25519strict and MLS KeyPackage parsing in
// protocol/mls.
package protocol
