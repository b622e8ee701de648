package mls

import "time"

// maxUnix is 9999-12-31T23:59:59Z, the largest time Info reports.
const maxUnix = 253402300799

// unixTime converts Unix seconds to a UTC time, clamping at maxUnix.
func unixTime(sec uint64) time.Time {
	return time.Unix(int64(min(sec, maxUnix)), 0).UTC()
}

// checkLifetime applies rules 10 and 11 of the package comment.
func checkLifetime(lt Lifetime, p Policy) *Error {
	skew := p.ClockSkew
	switch {
	case skew == 0:
		skew = DefaultClockSkew
	case skew < 0:
		skew = 0
	}
	const layout = time.RFC3339
	nb, na := unixTime(lt.NotBefore), unixTime(lt.NotAfter)
	if lt.NotAfter < lt.NotBefore {
		// Never valid, whatever the clock says.
		return newError(RuleExpired, "lifetime ends %s (%d), before it starts %s (%d)",
			na.Format(layout), lt.NotAfter, nb.Format(layout), lt.NotBefore)
	}
	now := p.Now
	if nb.After(now.Add(skew)) {
		return newError(RuleNotYetValid, "lifetime starts %s, after now (%s) plus %s clock skew",
			nb.Format(layout), now.UTC().Format(layout), skew)
	}
	if na.Before(now.Add(-skew)) {
		return newError(RuleExpired, "lifetime ended %s, before now (%s) minus %s clock skew",
			na.Format(layout), now.UTC().Format(layout), skew)
	}
	maxLife := p.MaxLifetime
	if maxLife == 0 {
		maxLife = DefaultMaxLifetime
	}
	if maxLife > 0 {
		span := lt.NotAfter - lt.NotBefore
		if span > uint64(maxLife/time.Second) {
			return newError(RuleLifetimeTooLong, "lifetime spans %d s (%.1f days), more than the maximum %s (%.1f days)",
				span, float64(span)/86400, maxLife, maxLife.Hours()/24)
		}
	}
	return nil
}
