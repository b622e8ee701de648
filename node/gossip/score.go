package gossip

import (
	"net"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"
)

// Peer scoring. Every message carries its device's or account's signature
// and every node validates it the same way before forwarding, so an honest
// peer never forwards an invalid message: a Reject is proof of a faulty or
// hostile sender. One invalid message costs invalid² × 100, so a peer that
// sends 2 falls below the gossip threshold (−100: no gossip to or from it),
// 2 below publish (−200) and 3 below graylist (−400: everything it sends is
// ignored). The counter decays to 1% in an hour. A little positive score
// for first deliveries and time in mesh keeps long-lived honest peers
// well above zero.
const (
	gossipThreshold    = -100
	publishThreshold   = -200
	graylistThreshold  = -400
	invalidWeight      = -100
	acceptPXThreshold  = 10
	opportunisticGraft = 5
	// bannedScore is the app-specific score of a peer the guard has cut
	// off, well below graylistThreshold: nothing it sends is processed.
	bannedScore = 10 * graylistThreshold
)

func scoreParams(topics []string, appScore func(peer.ID) float64) (*pubsub.PeerScoreParams, *pubsub.PeerScoreThresholds) {
	tp := make(map[string]*pubsub.TopicScoreParams, len(topics))
	for _, t := range topics {
		tp[t] = &pubsub.TopicScoreParams{
			SkipAtomicValidation:           true,
			TopicWeight:                    1,
			TimeInMeshWeight:               0.01,
			TimeInMeshQuantum:              time.Second,
			TimeInMeshCap:                  300,
			FirstMessageDeliveriesWeight:   0.5,
			FirstMessageDeliveriesDecay:    pubsub.ScoreParameterDecay(10 * time.Minute),
			FirstMessageDeliveriesCap:      100,
			InvalidMessageDeliveriesWeight: invalidWeight,
			InvalidMessageDeliveriesDecay:  pubsub.ScoreParameterDecay(time.Hour),
		}
	}
	_, loop4, _ := net.ParseCIDR("127.0.0.0/8")
	_, loop6, _ := net.ParseCIDR("::1/128")
	params := &pubsub.PeerScoreParams{
		SkipAtomicValidation: true,
		Topics:               tp,
		AppSpecificScore:     appScore,
		AppSpecificWeight:    1,
		// Many peers behind one IP is a Sybil signal on the internet; on a
		// loopback testnet it is every peer, so loopback is exempt.
		IPColocationFactorWeight:    -10,
		IPColocationFactorThreshold: 8,
		IPColocationFactorWhitelist: []*net.IPNet{loop4, loop6},
		BehaviourPenaltyWeight:      -10,
		BehaviourPenaltyThreshold:   6,
		BehaviourPenaltyDecay:       pubsub.ScoreParameterDecay(10 * time.Minute),
		DecayInterval:               time.Second,
		DecayToZero:                 0.01,
		RetainScore:                 10 * time.Minute,
	}
	thresholds := &pubsub.PeerScoreThresholds{
		GossipThreshold:             gossipThreshold,
		PublishThreshold:            publishThreshold,
		GraylistThreshold:           graylistThreshold,
		AcceptPXThreshold:           acceptPXThreshold,
		OpportunisticGraftThreshold: opportunisticGraft,
	}
	return params, thresholds
}
