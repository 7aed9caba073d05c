#!/usr/bin/env python3
"""Runs ccxt's unmodified `binance` class against a Mediator server.

Only configuration is changed: the API URLs, and spot-only market loading (the server has no
futures, so ccxt's default `fetchMarkets` types `linear` and `inverse` have nothing to load).
ccxt's defaults otherwise: `fetchCurrencies` (capital/config/getall) and `fetchMargins`
(margin/allPairs, margin/isolated/allPairs) run in `load_markets()`.
Environment:
  MEDIATOR_URL                          http://127.0.0.1:PORT
  MEDIATOR_API_KEY, MEDIATOR_API_SECRET the taker account (BTC and USD)
  MEDIATOR_API_KEY2, MEDIATOR_API_SECRET2  the maker account (BTC and USD)
  MEDIATOR_WITHDRAW_ADDRESS             optional: a regtest address to withdraw to
Exits non-zero when any check fails; prints every check.
"""
import asyncio
import os
import sys
import time
import traceback

import ccxt

URL = os.environ["MEDIATOR_URL"].rstrip("/")
WS = URL.replace("http://", "ws://").replace("https://", "wss://")
SYMBOL = "BTC/USD"


def config(key, secret):
    return {
        "apiKey": key,
        "secret": secret,
        "urls": {
            "api": {
                "public": URL + "/api/v3",
                "private": URL + "/api/v3",
                "v1": URL + "/api/v1",
                "sapi": URL + "/sapi/v1",
                "ws": {"spot": WS + "/ws", "ws-api": {"spot": WS + "/ws-api/v3"}},
            }
        },
        "options": {"fetchMarkets": ["spot"]},
    }


taker = ccxt.binance(config(os.environ["MEDIATOR_API_KEY"], os.environ["MEDIATOR_API_SECRET"]))
maker = ccxt.binance(config(os.environ["MEDIATOR_API_KEY2"], os.environ["MEDIATOR_API_SECRET2"]))

failures = []


def check(name, fn):
    t0 = time.monotonic()
    try:
        detail = fn()
        took = f" [{time.monotonic() - t0:.1f} s]"
        print(f"ok   {name}{took}" + (f": {detail}" if detail is not None else ""))
        return True
    except Exception as e:  # noqa: BLE001 - report every failure and go on
        failures.append(name)
        print(f"FAIL {name}: {type(e).__name__}: {e}")
        traceback.print_exc(limit=3)
        return False


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


state = {}


def load_markets():
    markets = taker.load_markets()
    maker.load_markets()
    m = markets[SYMBOL]
    expect(m["id"] == "BTCUSD", m["id"])
    expect(m["base"] == "BTC" and m["quote"] == "USD", m)
    expect(m["spot"] and m["active"], "spot and active")
    expect(m["precision"]["price"] and m["precision"]["amount"], m["precision"])
    expect(m["limits"]["amount"]["min"], m["limits"])
    state["market"] = m
    return f"{len(markets)} market(s), precision {m['precision']}, limits.amount {m['limits']['amount']}"


def currencies_and_fees():
    # Loaded by load_markets() with ccxt's defaults (capital/config/getall).
    btc = taker.currencies["BTC"]
    net = btc["networks"]["BTC"]
    expect(net["deposit"] and net["withdraw"], net)
    expect(net["fee"] is not None and net["limits"]["withdraw"]["min"] > 0, net)
    expect("USD" in taker.currencies, sorted(taker.currencies))
    # The server's fee rates, not ccxt's 0.1% default (asset/tradeFee).
    f = taker.fetch_trading_fee(SYMBOL)
    expect(f["maker"] == 0.001 and f["taker"] == 0.002, f)
    fs = taker.fetch_trading_fees()
    expect(fs[SYMBOL]["taker"] == 0.002, fs)
    s = taker.fetch_status()
    expect(s["status"] == "ok", s)
    # Rolling-window ticker (GET /api/v3/ticker).
    r = taker.publicGetTicker({"symbol": "BTCUSD", "windowSize": "1h"})
    expect(r["symbol"] == "BTCUSD" and "count" in r, r)
    return f"BTC withdraw fee {net['fee']} min {net['limits']['withdraw']['min']}, fees {f['maker']}/{f['taker']}, status {s['status']}"


def fetch_time():
    t = taker.fetch_time()
    expect(abs(t - taker.milliseconds()) < 60_000, t)
    return t


def balance():
    b = taker.fetch_balance()
    expect(b["BTC"]["free"] > 0, b["BTC"])
    expect(b["USD"]["free"] > 0, b["USD"])
    state["btc0"] = b["BTC"]["total"]
    return f"BTC {b['BTC']}, USD {b['USD']}"


def cleanup():
    for ex in (taker, maker):
        ex.cancel_all_orders(SYMBOL) if ex.fetch_open_orders(SYMBOL) else None
    # What earlier runs left, so that the counts below are this run's.
    state["trades0"] = len(taker.fetch_my_trades(SYMBOL))
    state["orders0"] = len(taker.fetch_orders(SYMBOL))


def limit_orders():
    # The maker rests asks and bids; the taker crosses one of them.
    a = maker.create_order(SYMBOL, "limit", "sell", 0.01, 50000)
    expect(a["status"] == "open" and a["id"], a)
    expect(a["amount"] == 0.01 and a["price"] == 50000, a)
    state["ask"] = a["id"]
    maker.create_order(SYMBOL, "limit", "sell", 0.5, 50100)
    maker.create_order(SYMBOL, "limit", "buy", 0.5, 49900)
    bid = maker.create_order(SYMBOL, "limit", "buy", 0.01, 40000)
    state["bid"] = bid["id"]
    t = taker.create_order(SYMBOL, "limit", "buy", 0.01, 50000)
    expect(t["status"] == "closed", t)
    expect(t["filled"] == 0.01 and t["remaining"] == 0, t)
    expect(t["average"] == 50000 and t["cost"] == 500, t)
    state["taker_limit"] = t["id"]
    return f"taker limit buy {t['id']} filled {t['filled']} @ {t['average']}, fee {t.get('fee')}"


def fetch_order():
    o = taker.fetch_order(state["taker_limit"], SYMBOL)
    expect(o["status"] == "closed" and o["filled"] == 0.01, o)
    expect(o["side"] == "buy" and o["type"] == "limit", o)
    o = maker.fetch_order(state["ask"], SYMBOL)
    expect(o["status"] == "closed", o)
    return f"{o['id']} {o['status']}"


def order_book():
    ob = taker.fetch_order_book(SYMBOL, 10)
    expect(ob["asks"][0][:2] == [50100, 0.5], ob["asks"])
    expect(ob["bids"][0][:2] == [49900, 0.5], ob["bids"])
    expect(ob["nonce"], "lastUpdateId")
    return f"best bid {ob['bids'][0]}, best ask {ob['asks'][0]}"


def ticker():
    t = taker.fetch_ticker(SYMBOL)
    expect(t["last"] == 50000, t)
    expect(t["bid"] == 49900 and t["ask"] == 50100, t)
    expect(t["baseVolume"] >= 0.01, t)
    tickers = taker.fetch_tickers([SYMBOL])
    expect(SYMBOL in tickers, tickers)
    return f"last {t['last']} bid {t['bid']} ask {t['ask']} vol {t['baseVolume']}"


def trades():
    ts = taker.fetch_trades(SYMBOL)
    expect(len(ts) >= 1, ts)
    expect(ts[-1]["price"] == 50000 and ts[-1]["amount"] == 0.01, ts[-1])
    expect(ts[-1]["side"] == "buy", ts[-1])
    return f"{len(ts)} trade(s), last {ts[-1]['price']} x {ts[-1]['amount']} {ts[-1]['side']}"


def ohlcv():
    c = taker.fetch_ohlcv(SYMBOL, "1m")
    expect(len(c) >= 1, c)
    expect(c[-1][4] == 50000 and c[-1][5] >= 0.01, c[-1])
    return f"{len(c)} candle(s), last {c[-1]}"


def market_orders():
    b = taker.create_order(SYMBOL, "market", "buy", 0.02)
    expect(b["status"] == "closed" and b["filled"] == 0.02, b)
    expect(b["average"] == 50100, b)
    s = taker.create_order(SYMBOL, "market", "sell", 0.02)
    expect(s["status"] == "closed" and s["filled"] == 0.02 and s["average"] == 49900, s)
    return f"market buy {b['filled']} @ {b['average']}, market sell {s['filled']} @ {s['average']}"


def market_buy_with_cost():
    expect(taker.has.get("createMarketBuyOrderWithCost"), "ccxt maps quoteOrderQty")
    # Mediator charges the fee in the quote asset and keeps cost + fee within quoteOrderQty
    # (Binance charges a buyer in the base asset): 501 USD at 50,100 buys 0.00998 BTC.
    o = taker.create_market_buy_order_with_cost(SYMBOL, 501)
    expect(o["status"] == "closed" and o["info"]["origQuoteOrderQty"] == "501.00000000", o)
    expect(0.0099 < o["filled"] <= 0.01 and o["cost"] + o["fee"]["cost"] <= 501, o)
    # The same through createOrder's params (ccxt's documented alternative).
    o2 = taker.create_order(SYMBOL, "market", "buy", None, None, {"quoteOrderQty": 501})
    expect(o2["status"] == "closed" and o2["filled"] == o["filled"], o2)
    return f"cost {o['cost']} + fee {o['fee']['cost']} bought {o['filled']} BTC"


def open_orders_and_cancel():
    oo = maker.fetch_open_orders(SYMBOL)
    ids = {o["id"] for o in oo}
    expect(state["bid"] in ids, (state["bid"], ids))
    c = maker.cancel_order(state["bid"], SYMBOL)
    expect(c["status"] == "canceled" and c["id"] == state["bid"], c)
    oo = maker.fetch_open_orders(SYMBOL)
    expect(state["bid"] not in {o["id"] for o in oo}, oo)
    return f"{len(ids)} open, cancelled {c['id']}"


def cancel_all():
    maker.create_order(SYMBOL, "limit", "buy", 0.01, 30000)
    r = maker.cancel_all_orders(SYMBOL)
    expect(len(r) >= 1, r)
    expect(all(o["status"] == "canceled" for o in r), r)
    expect(maker.fetch_open_orders(SYMBOL) == [], "no open orders left")
    return f"cancelled {len(r)}"


def my_trades():
    ts = taker.fetch_my_trades(SYMBOL)
    # limit, market buy, market sell, 2 by cost
    expect(len(ts) - state["trades0"] == 5, ts)
    t = ts[-1]
    expect(t["order"] and t["symbol"] == SYMBOL and t["takerOrMaker"] == "taker", t)
    expect(t["fee"] and t["fee"]["currency"], t)
    return f"{len(ts)} trade(s); last {t['side']} {t['amount']} @ {t['price']} fee {t['fee']}"


def orders_history():
    os_ = taker.fetch_orders(SYMBOL)
    expect(len(os_) - state["orders0"] == 6, os_)  # the 5 above and the IOC
    closed = taker.fetch_closed_orders(SYMBOL)
    expect(all(o["status"] == "closed" for o in closed), closed)
    return f"{len(os_)} order(s), {len(closed)} closed"


def deposit_address():
    a = taker.fetch_deposit_address("BTC")
    expect(a["address"] and a["currency"] == "BTC", a)
    return a["address"]


def withdraw():
    dest = os.environ.get("MEDIATOR_WITHDRAW_ADDRESS")
    if not dest:
        return "skipped: MEDIATOR_WITHDRAW_ADDRESS not set"
    w = taker.withdraw("BTC", 0.001, dest)
    expect(w["id"], w)
    ws = taker.fetch_withdrawals("BTC")
    expect(any(x["id"] == w["id"] for x in ws), ws)
    taker.fetch_deposits("BTC")
    return f"withdrawal {w['id']}, {len(ws)} in history"


def order_options():
    # postOnly -> LIMIT_MAKER, timeInForce, clientOrderId -> newClientOrderId, triggerPrice ->
    # STOP_LOSS_LIMIT; fetch and cancel by client order id.
    p = maker.create_order(SYMBOL, "limit", "buy", 0.01, 20000, {"postOnly": True})
    expect(p["postOnly"] and p["info"]["type"] == "LIMIT_MAKER" and p["status"] == "open", p)
    i = taker.create_order(SYMBOL, "limit", "buy", 0.01, 45000, {"timeInForce": "IOC"})
    expect(i["status"] == "expired" and i["timeInForce"] == "IOC", i)
    c = maker.create_order(SYMBOL, "limit", "buy", 0.01, 21000, {"clientOrderId": "compat-1"})
    expect(c["clientOrderId"] == "compat-1", c)
    f = maker.fetch_order(None, SYMBOL, {"origClientOrderId": "compat-1"})
    expect(f["id"] == c["id"], f)
    x = maker.cancel_order(None, SYMBOL, {"origClientOrderId": "compat-1"})
    expect(x["status"] == "canceled" and x["id"] == c["id"], x)
    t = maker.create_order(SYMBOL, "limit", "sell", 0.01, 40000, {"triggerPrice": 41000})
    expect(t["info"]["type"] == "STOP_LOSS_LIMIT" and t["triggerPrice"] == 41000, t)
    maker.cancel_order(t["id"], SYMBOL)
    maker.cancel_order(p["id"], SYMBOL)
    return f"LIMIT_MAKER {p['id']}, IOC {i['status']}, by clientOrderId {x['id']}, stop {t['id']}"


def take_profit_and_oco():
    # takeProfitPrice -> TAKE_PROFIT_LIMIT (a sell that works once the price rises to it); an
    # OCO through ccxt's implicit methods for POST and DELETE /api/v3/orderList (issue 9).
    t = maker.create_order(SYMBOL, "limit", "sell", 0.01, 60000, {"takeProfitPrice": 61000})
    expect(t["info"]["type"] == "TAKE_PROFIT_LIMIT" and t["status"] == "open", t)
    maker.cancel_order(t["id"], SYMBOL)
    mid = maker.market(SYMBOL)["id"]
    r = maker.private_post_orderlist_oco({
        "symbol": mid, "side": "SELL", "quantity": "0.01",
        "aboveType": "LIMIT_MAKER", "abovePrice": "70000",
        "belowType": "STOP_LOSS", "belowStopPrice": "30000",
    })
    expect(r["contingencyType"] == "OCO" and len(r["orderReports"]) == 2, r)
    o = maker.fetch_order(str(r["orderReports"][0]["orderId"]), SYMBOL)
    expect(o["info"]["orderListId"] == r["orderListId"] and o["status"] == "open", o)
    c = maker.private_delete_orderlist({"symbol": mid, "orderListId": r["orderListId"]})
    expect(c["listOrderStatus"] == "ALL_DONE", c)
    return f"TAKE_PROFIT_LIMIT {t['id']}, OCO list {r['orderListId']}"


def edit_order():
    o = maker.create_order(SYMBOL, "limit", "buy", 0.01, 22000)
    e = maker.edit_order(o["id"], SYMBOL, "limit", "buy", 0.02, 22500)
    expect(e["id"] != o["id"] and e["price"] == 22500 and e["amount"] == 0.02, e)
    expect(maker.fetch_order(o["id"], SYMBOL)["status"] == "canceled", "replaced order")
    maker.cancel_order(e["id"], SYMBOL)
    return f"{o['id']} -> {e['id']}"


def more_market_data():
    ba = taker.fetch_bids_asks([SYMBOL])
    expect(ba[SYMBOL]["bid"] == 49900 and ba[SYMBOL]["ask"] == 50100, ba)
    lp = taker.fetch_last_prices([SYMBOL])
    expect(lp[SYMBOL]["price"] == 50100, lp)  # the last buy by cost
    since = taker.milliseconds() - 3_600_000
    c = taker.fetch_ohlcv(SYMBOL, "1h", since, 5)
    expect(1 <= len(c) <= 5, c)
    return f"bidsAsks {ba[SYMBOL]['bid']}/{ba[SYMBOL]['ask']}, last {lp[SYMBOL]['price']}"


async def pro_streams():
    import ccxt.pro as ccxtpro

    ex = ccxtpro.binance(config(os.environ["MEDIATOR_API_KEY"], os.environ["MEDIATOR_API_SECRET"]))
    done = []
    try:
        await ex.load_markets()
        ob = await asyncio.wait_for(ex.watch_order_book(SYMBOL), 10)
        expect(ob["asks"] and ob["asks"][0][0] == 50100, ob["asks"][:1])
        done.append("watchOrderBook")
        # ccxt's default for watchTicker is the <symbol>@miniTicker stream (no bid/ask) ...
        t = await asyncio.wait_for(ex.watch_ticker(SYMBOL), 10)
        expect(t["symbol"] == SYMBOL and t["last"] > 0 and t["baseVolume"] > 0, t)
        # ... and {"name": "ticker"} selects the full <symbol>@ticker one.
        t = await asyncio.wait_for(ex.watch_ticker(SYMBOL, {"name": "ticker"}), 10)
        expect(t["ask"] == 50100 and t["bid"] == 49900 and t["last"] > 0, t)
        done.append("watchTicker")

        async def trade_soon():
            await asyncio.sleep(0.5)
            await asyncio.to_thread(maker.create_order, SYMBOL, "limit", "sell", 0.01, 50050)
            await asyncio.to_thread(taker.create_order, SYMBOL, "market", "buy", 0.01)

        task = asyncio.ensure_future(trade_soon())
        ts = await asyncio.wait_for(ex.watch_trades(SYMBOL), 10)
        await task
        expect(ts and ts[-1]["price"] == 50050, ts)
        done.append("watchTrades")
        k = await asyncio.wait_for(ex.watch_ohlcv(SYMBOL, "1m"), 10)
        expect(k and k[-1][4] > 0, k)
        done.append("watchOHLCV")
        # All markets' tickers (!ticker@arr, ccxt's stream when no symbol is named).
        ts = await asyncio.wait_for(ex.watch_tickers(), 10)
        expect(SYMBOL in ts and ts[SYMBOL]["last"] > 0, ts)
        done.append("watchTickers")

        async def agg_soon():
            await asyncio.sleep(0.5)
            await asyncio.to_thread(maker.create_order, SYMBOL, "limit", "sell", 0.01, 50060)
            await asyncio.to_thread(taker.create_order, SYMBOL, "market", "buy", 0.01)

        task = asyncio.ensure_future(agg_soon())
        ts = await asyncio.wait_for(ex.watch_trades(SYMBOL, None, None, {"name": "aggTrade"}), 10)
        await task
        expect(ts and ts[-1]["price"] == 50060, ts)
        done.append("watchTrades aggTrade")

        # Private: the user data stream (ccxt subscribes through the WebSocket API with a
        # signature for spot).
        async def order_soon():
            await asyncio.sleep(1.0)
            await asyncio.to_thread(taker.create_order, SYMBOL, "limit", "buy", 0.01, 20000)

        task = asyncio.ensure_future(order_soon())
        os_ = await asyncio.wait_for(ex.watch_orders(SYMBOL), 10)
        await task
        expect(os_ and os_[-1]["price"] == 20000 and os_[-1]["status"] == "open", os_)
        done.append("watchOrders")

        async def cancel_soon():
            await asyncio.sleep(0.5)
            await asyncio.to_thread(taker.cancel_order, os_[-1]["id"], SYMBOL)

        task = asyncio.ensure_future(cancel_soon())
        b = await asyncio.wait_for(ex.watch_balance(), 10)
        await task
        expect(b["USD"]["total"] > 0, b)
        done.append("watchBalance")
        return ", ".join(done)
    except Exception as e:
        raise AssertionError(f"after {done}: {type(e).__name__}: {e}") from e
    finally:
        await ex.close()


async def pro_ws_api():
    # ccxt.pro's WebSocket API calls (urls.api.ws.ws-api.spot, configured above): signed with
    # the key's HMAC over the sorted parameters, returnRateLimits=false.
    import ccxt.pro as ccxtpro

    ex = ccxtpro.binance(config(os.environ["MEDIATOR_API_KEY"], os.environ["MEDIATOR_API_SECRET"]))
    done = []
    try:
        await ex.load_markets()
        o = await asyncio.wait_for(ex.create_order_ws(SYMBOL, "limit", "buy", 0.01, 21000), 10)
        expect(o["id"] and o["status"] == "open" and o["price"] == 21000, o)
        done.append("createOrderWs")
        f = await asyncio.wait_for(ex.fetch_order_ws(o["id"], SYMBOL), 10)
        expect(f["id"] == o["id"] and f["status"] == "open" and f["amount"] == 0.01, f)
        done.append("fetchOrderWs")
        c = await asyncio.wait_for(ex.cancel_order_ws(o["id"], SYMBOL), 10)
        expect(c["id"] == o["id"] and c["status"] == "canceled", c)
        done.append("cancelOrderWs")
        # ccxt 4.5.90 parses the spot `account.status` answer with its futures parser (no
        # market type is passed on), so the unified entries stay empty, against Binance too; the
        # answer itself is in `info`.
        b = await asyncio.wait_for(ex.fetch_balance_ws(), 10)
        bal = {x["asset"]: x for x in b["info"]["balances"]}
        expect(b["info"]["canTrade"] and float(bal["USD"]["free"]) > 0, b)
        expect(float(bal["BTC"]["free"]) > 0, b)
        done.append("fetchBalanceWs (info)")
        # ccxt 4.5.90 sends fetchOrderBookWs for linear (USD-M futures) markets only and refuses
        # a spot symbol itself, before sending anything (its own BadRequest).
        try:
            await ex.fetch_order_book_ws(SYMBOL)
            raise AssertionError("ccxt sent fetchOrderBookWs for a spot market")
        except ccxt.BadRequest as e:
            expect("only supports swap markets" in str(e), e)
        done.append("fetchOrderBookWs (spot refused by ccxt itself)")
        return ", ".join(done)
    except Exception as e:
        raise AssertionError(f"after {done}: {type(e).__name__}: {e}") from e
    finally:
        await ex.close()


print(f"ccxt {ccxt.__version__} against {URL}")
check("cleanup (cancel leftovers)", cleanup)
check("fetchTime", fetch_time)
if not check("loadMarkets (exchangeInfo)", load_markets):
    print("cannot go on without markets")
    sys.exit(1)
check("currencies (fetchCurrencies) / fetchTradingFee(s) / fetchStatus / rolling ticker", currencies_and_fees)
check("fetchBalance", balance)
check("createOrder limit (buy and sell)", limit_orders)
check("fetchOrder", fetch_order)
check("fetchOrderBook", order_book)
check("fetchTicker / fetchTickers", ticker)
check("fetchTrades", trades)
check("fetchOHLCV", ohlcv)
check("createOrder market buy and sell", market_orders)
check("createMarketBuyOrderWithCost (quoteOrderQty)", market_buy_with_cost)
check("fetchOpenOrders / cancelOrder", open_orders_and_cancel)
check("fetchBidsAsks / fetchLastPrices / fetchOHLCV since+limit", more_market_data)
check("createOrder postOnly / IOC / clientOrderId / triggerPrice", order_options)
check("createOrder takeProfitPrice / OCO (orderList/oco)", take_profit_and_oco)
check("editOrder (cancelReplace)", edit_order)
check("fetchMyTrades", my_trades)
check("fetchOrders / fetchClosedOrders", orders_history)
check("fetchDepositAddress", deposit_address)
check("withdraw / fetchWithdrawals / fetchDeposits", withdraw)
try:
    import ccxt.pro  # noqa: F401 - bundled with ccxt since 4.x
    has_pro = True
except ImportError:
    has_pro = False
    print("skip ccxt.pro: not in this ccxt")
if has_pro:
    check("ccxt.pro watchOrderBook / watchTicker / watchTrades / watchOHLCV / watchOrders / watchBalance", lambda: asyncio.run(pro_streams()))
    check("ccxt.pro createOrderWs / fetchOrderWs / cancelOrderWs / fetchBalanceWs / fetchOrderBookWs", lambda: asyncio.run(pro_ws_api()))
check("cancelAllOrders", cancel_all)

if failures:
    print(f"{len(failures)} check(s) failed: {', '.join(failures)}")
    sys.exit(1)
print("all ccxt checks passed")
