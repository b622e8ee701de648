package fetch

import (
	"testing"
	"time"

	"github.com/kpnode/kpnode/internal/nodetest"
	"github.com/kpnode/kpnode/node/fetch/fetchtest"
	"github.com/kpnode/kpnode/storage"
)

// The configs take their defaults and refuse what cannot work.
func TestFetchConfigsValidate(t *testing.T) {
	store := nodetest.OpenStore(t, storage.Options{})
	good := ServerConfig{Protocol: testProto, Store: store}
	if err := good.Validate(); err != nil {
		t.Fatalf("minimal server config: %v", err)
	}
	if c := good.withDefaults(); c.StreamTimeout != DefaultStreamTimeout || c.BulkBudget != DefaultBulkBudget || c.PointBudget != DefaultPointBudget || c.Logger == nil || c.Holds == nil {
		t.Fatalf("server defaults not applied: %+v", c)
	}
	for name, c := range map[string]ServerConfig{
		"no protocol":        {Store: store},
		"no store":           {Protocol: testProto},
		"negative timeout":   {Protocol: testProto, Store: store, StreamTimeout: -time.Second},
		"point budget < one": {Protocol: testProto, Store: store, PointBudget: PointWeight - 1},
	} {
		if c.Validate() == nil {
			t.Errorf("server config %s: accepted", name)
		}
		if _, err := NewServer(c); err == nil {
			t.Errorf("NewServer with %s: no error", name)
		}
	}
	pipes := fetchtest.New(clientID)
	v := PolicyValidator{Policy: testPolicy()}
	c, err := NewClient(ClientConfig{Protocol: testProto, Opener: pipes, Validator: v})
	if err != nil || c.cfg.Timeout != DefaultTimeout {
		t.Fatalf("minimal client config: %v, timeout %v", err, c.cfg.Timeout)
	}
	for name, c := range map[string]ClientConfig{
		"no protocol":      {Opener: pipes, Validator: v},
		"no opener":        {Protocol: testProto, Validator: v},
		"no validator":     {Protocol: testProto, Opener: pipes},
		"negative timeout": {Protocol: testProto, Opener: pipes, Validator: v, Timeout: -time.Second},
	} {
		if _, err := NewClient(c); err == nil {
			t.Errorf("client config %s: accepted", name)
		}
	}
}
