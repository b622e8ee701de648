package protocol

import (
	"errors"
	"time"

	"github.com/kpnode/kpnode/protocol/mls"
)

// validateKeyPackage applies the MLS rules of strict mode (protocol/mls):
// the key_package must be a valid RFC 9420 KeyPackage of an Ed25519 suite
// whose leaf signature key is the device key. Rule names are "mls_" plus the
// mls rule, e.g. mls_lifetime_expired.
func (p Policy) validateKeyPackage(kp []byte, device Key, now time.Time) (mls.Info, error) {
	info, err := mls.Validate(kp, device[:], mls.Policy{Now: now, ClockSkew: p.ClockSkew, MaxLifetime: p.MaxKeyPackageLifetime})
	if err != nil {
		rule := RuleMLS
		var me *mls.Error
		if errors.As(err, &me) {
			rule = RuleMLS + "_" + Rule(me.Rule)
		}
		return mls.Info{}, &ValidationError{Rule: rule, Field: "key_package", Detail: err.Error(), Err: err}
	}
	return info, nil
}
