package mls_test

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"time"

	"github.com/kpnode/kpnode/protocol/mls"
	"github.com/kpnode/kpnode/protocol/mls/mlstest"
)

func ExampleValidate() {
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	data, signer, err := mlstest.Generate(mlstest.Options{Suite: mls.SuiteXWing, LastResort: true, Now: now})
	if err != nil {
		panic(err)
	}
	deviceKey := signer.Public().(ed25519.PublicKey)

	info, err := mls.Validate(data, deviceKey, mls.Policy{Now: now})
	fmt.Println(err, info.LastResort, info.Ref == mls.Ref(data))

	// A month after it expired.
	_, err = mls.Validate(data, deviceKey, mls.Policy{Now: now.AddDate(0, 4, 0)})
	var me *mls.Error
	if errors.As(err, &me) {
		fmt.Println(me.Rule)
	}
	// Output:
	// <nil> true true
	// lifetime_expired
}
