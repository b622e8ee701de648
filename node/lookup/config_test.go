package lookup

import (
	"testing"
	"time"
)

// The config takes its defaults and refuses what cannot work.
func TestLookupConfigValidate(t *testing.T) {
	w := newWorld(t, nil)
	base := func() Config {
		return Config{Holders: w.find, Fetcher: w.lookup.cfg.Fetcher, Floors: w.floors, ShardCount: shardCount, Retention: time.Hour}
	}
	if err := base().Validate(); err != nil {
		t.Fatalf("minimal config: %v", err)
	}
	c := base().withDefaults()
	if c.Timeout != DefaultTimeout || c.Grace != DefaultGrace || c.CacheSize != DefaultCacheSize || c.CacheTTL != DefaultCacheTTL ||
		c.CacheRefresh != DefaultCacheRefresh || c.NegativeTTL != DefaultNegativeTTL || c.Now == nil || c.Logger == nil {
		t.Fatalf("defaults not applied: %+v", c)
	}
	for name, mutate := range map[string]func(*Config){
		"no finder":            func(c *Config) { c.Holders = nil },
		"no fetcher":           func(c *Config) { c.Fetcher = nil },
		"no floors":            func(c *Config) { c.Floors = nil },
		"no shards":            func(c *Config) { c.ShardCount = 0 },
		"257 shards":           func(c *Config) { c.ShardCount = 257 },
		"no retention":         func(c *Config) { c.Retention = 0 },
		"grace over timeout":   func(c *Config) { c.Timeout, c.Grace = time.Second, 2*time.Second },
		"negative grace":       func(c *Config) { c.Grace = -time.Second },
		"negative cache size":  func(c *Config) { c.CacheSize = -1 },
		"negative negativeTTL": func(c *Config) { c.NegativeTTL = -time.Second },
	} {
		c := base()
		mutate(&c)
		if _, err := New(c); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
