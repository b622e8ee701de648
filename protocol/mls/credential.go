package mls

import (
	"bytes"
	"crypto/ed25519"
	"crypto/x509"
)

// checkCredential applies the credential rules. A basic credential's
// identity is opaque to the registry and always accepted. For an x509
// credential the chain must not be empty and the end-entity (first)
// certificate must parse and carry signature_key as its Ed25519 public key.
// The chain is not verified: the registry has no trust anchors, and the
// Authentication Service is the application's business.
func checkCredential(c *Credential, signatureKey []byte) *Error {
	if c.Type != CredentialX509 {
		return nil
	}
	if len(c.Certificates) == 0 {
		return newError(RuleCredential, "x509 credential has an empty certificate chain")
	}
	cert, err := x509.ParseCertificate(c.Certificates[0])
	if err != nil {
		return wrapError(RuleCredential, err, "x509 end-entity certificate does not parse: %v", err)
	}
	pub, ok := cert.PublicKey.(ed25519.PublicKey)
	if !ok {
		return newError(RuleCredential, "x509 end-entity certificate has a %s key, not Ed25519", cert.PublicKeyAlgorithm)
	}
	if !bytes.Equal(pub, signatureKey) {
		return newError(RuleCredential,
			"x509 end-entity certificate key %x is not leaf_node.signature_key %x", []byte(pub), signatureKey)
	}
	return nil
}
