#!/usr/bin/env python3
"""Runs python-binance's unmodified `Client` against a Mediator server.

Only configuration is changed: the API URLs (`ping=False` because the constructor would ping
api.binance.com before they are set).
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
from importlib.metadata import version

from binance.client import Client

URL = os.environ["MEDIATOR_URL"].rstrip("/")
WS = URL.replace("http://", "ws://").replace("https://", "wss://")
SYMBOL = "BTCUSD"


def client(key, secret):
    c = Client(key, secret, ping=False)
    c.API_URL = URL + "/api"
    c.MARGIN_API_URL = URL + "/sapi"
    return c


taker = client(os.environ["MEDIATOR_API_KEY"], os.environ["MEDIATOR_API_SECRET"])
maker = client(os.environ["MEDIATOR_API_KEY2"], os.environ["MEDIATOR_API_SECRET2"])

failures = []
state = {}


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


def cleanup():
    for c in (taker, maker):
        if c.get_open_orders(symbol=SYMBOL):
            c.cancel_all_open_orders(symbol=SYMBOL)


def ping_time():
    expect(taker.ping() == {}, "ping")
    t = taker.get_server_time()["serverTime"]
    expect(abs(t - time.time() * 1000) < 60_000, t)
    return t


def exchange_info():
    info = taker.get_exchange_info()
    s = [x for x in info["symbols"] if x["symbol"] == SYMBOL][0]
    expect(s["baseAsset"] == "BTC" and s["quoteAsset"] == "USD", s)
    filters = {f["filterType"] for f in s["filters"]}
    expect({"PRICE_FILTER", "LOT_SIZE"} <= filters, filters)
    expect(taker.get_symbol_info(SYMBOL)["symbol"] == SYMBOL, "get_symbol_info")
    return f"{len(info['symbols'])} symbol(s), filters {sorted(filters)}"


def account():
    a = taker.get_account()
    expect(a["canTrade"], a)
    b = taker.get_asset_balance(asset="BTC")
    expect(float(b["free"]) > 0, b)
    u = taker.get_asset_balance(asset="USD")
    expect(float(u["free"]) > 0, u)
    return f"BTC {b}, USD {u}"


def limit_orders():
    a = maker.order_limit_sell(symbol=SYMBOL, quantity="0.01", price="60000")
    expect(a["status"] == "NEW" and a["orderId"], a)
    state["ask"] = a["orderId"]
    maker.create_order(
        symbol=SYMBOL, side=Client.SIDE_SELL, type=Client.ORDER_TYPE_LIMIT,
        timeInForce=Client.TIME_IN_FORCE_GTC, quantity="0.5", price="60100",
    )
    maker.order_limit_buy(symbol=SYMBOL, quantity="0.5", price="59900")
    b = maker.order_limit_buy(symbol=SYMBOL, quantity="0.01", price="30000")
    state["bid"] = b["orderId"]
    t = taker.order_limit_buy(symbol=SYMBOL, quantity="0.01", price="60000")
    expect(t["status"] == "FILLED" and float(t["executedQty"]) == 0.01, t)
    state["taker"] = t["orderId"]
    return f"taker {t['orderId']} {t['status']} fills {t.get('fills')}"


def get_order():
    o = taker.get_order(symbol=SYMBOL, orderId=state["taker"])
    expect(o["status"] == "FILLED" and o["side"] == "BUY", o)
    o = maker.get_order(symbol=SYMBOL, orderId=state["ask"])
    expect(o["status"] == "FILLED", o)
    return f"{o['orderId']} {o['status']}"


def order_book():
    ob = taker.get_order_book(symbol=SYMBOL, limit=10)
    expect(ob["asks"][0] == ["60100.00", "0.50000000"] or float(ob["asks"][0][0]) == 60100, ob)
    expect(float(ob["bids"][0][0]) == 59900, ob)
    return f"bid {ob['bids'][0]} ask {ob['asks'][0]}"


def tickers():
    p = taker.get_symbol_ticker(symbol=SYMBOL)
    expect(float(p["price"]) == 60000, p)
    t = taker.get_ticker(symbol=SYMBOL)
    expect(float(t["lastPrice"]) == 60000, t)
    bt = taker.get_orderbook_ticker(symbol=SYMBOL)
    expect(float(bt["bidPrice"]) == 59900 and float(bt["askPrice"]) == 60100, bt)
    avg = taker.get_avg_price(symbol=SYMBOL)
    expect("price" in avg, avg)
    return f"price {p['price']}, 24h volume {t['volume']}"


def trades_and_klines():
    ts = taker.get_recent_trades(symbol=SYMBOL)
    expect(float(ts[-1]["price"]) == 60000, ts[-1])
    agg = taker.get_aggregate_trades(symbol=SYMBOL)
    expect(len(agg) >= 1, agg)
    k = taker.get_klines(symbol=SYMBOL, interval=Client.KLINE_INTERVAL_1MINUTE)
    expect(len(k) >= 1 and float(k[-1][4]) == 60000, k)
    return f"{len(ts)} trade(s), {len(k)} kline(s)"


def market_orders():
    b = taker.order_market_buy(symbol=SYMBOL, quantity="0.02")
    expect(b["status"] == "FILLED", b)
    s = taker.order_market_sell(symbol=SYMBOL, quantity="0.02")
    expect(s["status"] == "FILLED", s)
    # The fee is charged in USD within quoteOrderQty: 601 USD at 60,100 buys 0.00998 BTC.
    q = taker.order_market_buy(symbol=SYMBOL, quoteOrderQty="601")
    expect(q["status"] == "FILLED" and q["origQuoteOrderQty"] == "601.00000000", q)
    expect(0.0099 < float(q["executedQty"]) <= 0.01, q)
    taker.create_test_order(
        symbol=SYMBOL, side="BUY", type="LIMIT", timeInForce="GTC", quantity="0.01", price="1000"
    )
    return f"buy {b['executedQty']}, sell {s['executedQty']}, by quote {q['executedQty']}"


def open_and_cancel():
    oo = maker.get_open_orders(symbol=SYMBOL)
    expect(state["bid"] in {o["orderId"] for o in oo}, oo)
    c = maker.cancel_order(symbol=SYMBOL, orderId=state["bid"])
    expect(c["status"] == "CANCELED", c)
    all_ = maker.get_all_orders(symbol=SYMBOL)
    expect(any(o["orderId"] == state["bid"] and o["status"] == "CANCELED" for o in all_), all_)
    return f"{len(oo)} open, cancelled {c['orderId']}"


def my_trades():
    ts = taker.get_my_trades(symbol=SYMBOL)
    expect(len(ts) >= 4, ts)
    expect(all(t["symbol"] == SYMBOL and "commission" in t for t in ts), ts)
    return f"{len(ts)} trade(s)"


def deposit_address():
    a = taker.get_deposit_address(coin="BTC")
    expect(a["coin"] == "BTC" and a["address"], a)
    taker.get_deposit_history(coin="BTC")
    return a["address"]


def withdraw():
    dest = os.environ.get("MEDIATOR_WITHDRAW_ADDRESS")
    if not dest:
        return "skipped: MEDIATOR_WITHDRAW_ADDRESS not set"
    w = taker.withdraw(coin="BTC", address=dest, amount="0.001")
    expect(w["id"], w)
    h = taker.get_withdraw_history(coin="BTC")
    expect(any(x["id"] == w["id"] for x in h), h)
    return f"withdrawal {w['id']}"


def coins_fees_status():
    coins = {c["coin"]: c for c in taker.get_all_coins_info()}
    net = coins["BTC"]["networkList"][0]
    expect(net["network"] == "BTC" and net["withdrawEnable"] and net["depositEnable"], net)
    expect(float(net["withdrawMin"]) > 0, net)
    fee = taker.get_trade_fee(symbol=SYMBOL)
    expect(fee == [{"symbol": SYMBOL, "makerCommission": "0.00100000", "takerCommission": "0.00200000"}], fee)
    st = taker.get_system_status()
    expect(st == {"status": 0, "msg": "normal"}, st)
    return f"BTC withdrawFee {net['withdrawFee']} withdrawMin {net['withdrawMin']}, fee {fee[0]}"


async def streams():
    # The asyncio client and its socket manager, configured through class attributes before
    # `create` (which pings): REST, and the WebSocket API that `user_socket` subscribes through.
    from binance import AsyncClient, BinanceSocketManager

    AsyncClient.API_URL = URL + "/api"
    AsyncClient.MARGIN_API_URL = URL + "/sapi"
    AsyncClient.WS_API_URL = WS + "/ws-api/v3"
    c = await AsyncClient.create(os.environ["MEDIATOR_API_KEY"], os.environ["MEDIATOR_API_SECRET"])
    done = []
    try:
        bm = BinanceSocketManager(c)
        bm.STREAM_URL = WS + "/"
        # One combined connection (python-binance's read loop notices an exit only after a
        # message or its 10 s receive timeout, so every socket closed on a quiet stream costs up
        # to 10 s) and the user data stream through the WebSocket API.
        names = ["btcusd@depth5", "btcusd@ticker", "btcusd@trade", "btcusd@kline_1m", "btcusd@aggTrade"]
        async with bm.multiplex_socket(names) as ms, bm.user_socket() as us:
            first = {}
            while len(first) < 2:  # the book and ticker are pushed on subscription
                m = await asyncio.wait_for(ms.recv(), 10)
                first.setdefault(m["stream"], m["data"])
            d = first["btcusd@depth5"]
            expect("bids" in d and "lastUpdateId" in d, d)
            t = first["btcusd@ticker"]
            expect(t["e"] == "24hrTicker" and t["s"] == SYMBOL, t)
            done.append("depth (partial) and 24h ticker streams")
            # Crosses the maker's resting bid at 59,900.
            await c.order_limit_sell(symbol=SYMBOL, quantity="0.01", price="59900")
            trade = kline = agg = None
            while trade is None or kline is None or agg is None:
                m = await asyncio.wait_for(ms.recv(), 10)
                if m["stream"] == "btcusd@trade":
                    trade = m["data"]
                if m["stream"] == "btcusd@aggTrade":
                    agg = m["data"]
                if m["stream"] == "btcusd@kline_1m" and m["data"]["k"]["c"] == "59900.00000000":
                    kline = m["data"]
            expect(trade["e"] == "trade" and trade["p"] == "59900.00000000", trade)
            expect(kline["e"] == "kline" and kline["k"]["i"] == "1m", kline)
            expect(agg["e"] == "aggTrade" and agg["p"] == "59900.00000000", agg)
            done.append("trade and kline streams")
            seen = set()
            while not {"NEW", "TRADE"} <= seen:
                u = await asyncio.wait_for(us.recv(), 10)
                if u.get("e") == "executionReport":
                    seen.add(u["x"])
            done.append("user_socket")
        return ", ".join(done)
    except Exception as e:
        raise AssertionError(f"after {done}: {type(e).__name__}: {e}") from e
    finally:
        await c.close_connection()


async def ws_api():
    # python-binance's ws_* calls: its WebSocket API client, pointed at the server through the
    # WS_API_URL class attribute (read by the constructor), signs each request (HMAC over the
    # form-encoded sorted parameters).
    from binance import AsyncClient

    AsyncClient.API_URL = URL + "/api"
    AsyncClient.MARGIN_API_URL = URL + "/sapi"
    AsyncClient.WS_API_URL = WS + "/ws-api/v3"
    c = await AsyncClient.create(os.environ["MEDIATOR_API_KEY"], os.environ["MEDIATOR_API_SECRET"])
    done = []
    try:
        expect(await c.ws_ping() == {}, "ws_ping")
        t = await c.ws_get_time()
        expect(abs(t["serverTime"] - time.time() * 1000) < 60_000, t)
        info = await c.ws_get_exchange_info(symbol=SYMBOL)
        expect(info["symbols"][0]["symbol"] == SYMBOL, info)
        done.append("ws_ping / ws_get_time / ws_get_exchange_info")
        o = await c.ws_create_order(
            symbol=SYMBOL, side="BUY", type="LIMIT", timeInForce="GTC", quantity="0.01", price="21000"
        )
        expect(o["status"] == "NEW" and o["clientOrderId"].startswith(c.SPOT_ORDER_PREFIX), o)
        done.append("ws_create_order")
        g = await c.ws_get_order(symbol=SYMBOL, orderId=o["orderId"])
        expect(g["orderId"] == o["orderId"] and g["price"] == "21000.00000000", g)
        oo = await c.ws_get_open_orders(symbol=SYMBOL)
        expect(o["orderId"] in {x["orderId"] for x in oo}, oo)
        done.append("ws_get_order / ws_get_open_orders")
        x = await c.ws_cancel_order(symbol=SYMBOL, orderId=o["orderId"])
        expect(x["status"] == "CANCELED", x)
        done.append("ws_cancel_order")
        ob = await c.ws_get_order_book(symbol=SYMBOL, limit=5)
        expect("bids" in ob and "asks" in ob and ob["lastUpdateId"] > 0, ob)
        done.append("ws_get_order_book")
        a = await c.ws_get_account()
        expect(a["canTrade"] and any(b["asset"] == "USD" for b in a["balances"]), a)
        tr = await c.ws_get_recent_trades(symbol=SYMBOL)
        expect(len(tr) >= 1, tr)
        p = await c.ws_get_symbol_ticker(symbol=SYMBOL)
        expect(float(p["price"]) > 0, p)
        done.append("ws_get_account / ws_get_recent_trades / ws_get_symbol_ticker")
        return ", ".join(done)
    except Exception as e:
        raise AssertionError(f"after {done}: {type(e).__name__}: {e}") from e
    finally:
        await c.close_connection()


print(f"python-binance {version('python-binance')} against {URL}")
check("cleanup (cancel leftovers)", cleanup)
check("ping / get_server_time", ping_time)
check("get_exchange_info / get_symbol_info", exchange_info)
check("get_account / get_asset_balance", account)
check("get_all_coins_info / get_trade_fee / get_system_status", coins_fees_status)
check("order_limit_sell / order_limit_buy / create_order", limit_orders)
check("get_order", get_order)
check("get_order_book", order_book)
check("get_symbol_ticker / get_ticker / get_orderbook_ticker / get_avg_price", tickers)
check("get_recent_trades / get_aggregate_trades / get_klines", trades_and_klines)
check("order_market_buy / order_market_sell / quoteOrderQty / create_test_order", market_orders)
check("get_open_orders / cancel_order / get_all_orders", open_and_cancel)
check("get_my_trades", my_trades)
check("get_deposit_address / get_deposit_history", deposit_address)
check("withdraw / get_withdraw_history", withdraw)
check(
    "AsyncClient + BinanceSocketManager multiplex (depth5, ticker, trade, kline, aggTrade) and user_socket",
    lambda: asyncio.run(streams()),
)
check(
    "WebSocket API: ws_create_order / ws_get_order / ws_cancel_order / ws_get_order_book / ws_get_account ...",
    lambda: asyncio.run(ws_api()),
)
check("cancel_all_open_orders", cleanup)

if failures:
    print(f"{len(failures)} check(s) failed: {', '.join(failures)}")
    sys.exit(1)
print("all python-binance checks passed")
