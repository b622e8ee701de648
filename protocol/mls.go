package protocol

import (
	"errors"
	"time"
)

// validateKeyPackage applies the MLS rules of strict mode.
func (p Policy) validateKeyPackage(kp []byte, device Key, now time.Time) (Ref, bool, error) {
	return Ref{}, false, &ValidationError{Rule: RuleMLS + "_unavailable", Field: "key_package", Detail: "strict MLS validation is not built yet", Err: errors.New("unimplemented")}
}
