"""m2cache.actors: the five actors of one engine and the messages between them.

One decode step, layer by layer (every arrow is a message on a bounded inbox or a future's answer;
``=>`` is a hop to a thread)::

    executor (event loop)                                   compute thread
      | _begin ===================================================> embed, attention 0, rank layer 0
      |                                                             (with lookahead: rank layer 1 too)
      | Progress(L) ---------------------------------> dram          (preloads ahead of the executor)
      | LayerInput(L, ranking) ---> predictor                        (policy's shares -> ids per precision)
      |                               | NeuronRequest ---> hbm       (plan slots: hits, misses, evictions)
      |                               |                  | Fetch ---> dram (pins DRAM rows, reads misses)
      |                               |                  |<-- FetchReply
      |                               |                  | => copy thread: rows up into the pool
      |<------------------------------------------------ WeightsReady (slots, ids, copy event)
      | _layer(L) =================================================> FFN L, attention L+1, rank L+1
      | Release ------------------------------------------> dram     (unpins)

In turn, layer L's LayerInput leaves once layer L-1's job returned its ranking, so the plan, the reads
and the copies of a layer wait for the compute of the one before and the compute waits for them.
With ``EngineConfig.lookahead`` (decode) a job ranks the layer after next from its residual: layer
L+1's LayerInput leaves before layer L's job starts, and its plan, reads and copies run while layer L
computes (the HBM manager keeps layer L's slots out of layer L+1's evictions).

Hops per layer: 5 messages (Progress, LayerInput, NeuronRequest, Fetch, Release), 2 futures (FetchReply,
WeightsReady), 1 round trip to the compute thread, and with copies to make 1 round trip to the copy
thread (on the CPU computing from DRAM there are none). Before the copies moved to the HBM manager they
ran inside the compute thread's job: one round trip fewer, but never beside the compute.
"""
